"""Optimizers, following PyTorch's update rules and defaults (schedules: ddl/schedules.py).

Every update writes `p.data` in place and only reads `p.grad`: the data-parallel wrapper makes
both views into flat buffers, so rebinding either would detach the parameter from it.
Per-parameter state (momentum buffers, Adam moments, ...) is keyed by the parameter's position in
`optimizer.params`, never by `id()`, so a saved state loads into a freshly built model.
Each class writes its rule out; the backend in use (ddl.kernels) runs it over flat arrays: the
NumPy backend's rules are the reference, the numba backend's are one pass each. Parameters that
lie end to end in one flat buffer (ddl/parallel.py's `flatten`, in training), stepped together,
are updated by one call of the rule: their state lies end to end too, in one flat buffer per
state entry.
"""
import numpy as np

from ddl import kernels


class Optimizer:
    """Base class: holds the ordered parameter list, the hyperparameters and per-position state.

    Subclasses pass their hyperparameters as keywords (they become plain attributes, so a schedule
    can set `opt.lr`) and implement `_check` (validation), `_state_names`, `_key` and `_update`.
    """

    def __init__(self, params, **hyper):
        self.params = list(params)
        if not self.params:
            raise ValueError(f"{type(self).__name__} got an empty parameter list")
        self._position = {id(p): i for i, p in enumerate(self.params)}
        if len(self._position) != len(self.params):
            raise ValueError(f"{type(self).__name__}: a parameter appears more than once")
        self._hyper_names = list(hyper)
        for k, v in hyper.items():
            setattr(self, k, v)
        self.state = {}  # position -> {name: array, or int for "step"}
        self._flat = {}  # (state name, dtype) -> one array for every position's entry, in order
        self._offsets = np.cumsum([0] + [p.data.size for p in self.params]).tolist()
        self._known_runs = None     # see _runs
        self._check()

    def _check(self):
        """Raise ValueError on invalid hyperparameters."""
        _nonneg(lr=self.lr, weight_decay=self.weight_decay)

    def _state_names(self):
        """The state entries one parameter has after its first step, under these hyperparameters."""
        raise NotImplementedError

    def _key(self, i):
        """What the parameters of one rule call must agree on (Adam's step count, say)."""
        return None

    def _update(self, run, data, grad):
        """Update the positions `run` (consecutive), whose parameters' data and grad are the flat
        arrays `data` and `grad`, in place with one call of the backend's rule."""
        raise NotImplementedError

    def step(self, params=None):
        """Update the given parameters (default: all), in their order. Each must be one of
        `self.params`."""
        positions = []
        for p in self.params if params is None else params:
            i = self._position.get(id(p))
            if i is None:
                raise ValueError(f"{type(self).__name__}.step: {p!r} is not one of the parameters "
                                 "this optimizer was built with")
            positions.append(i)
        for run, data, grad in self._runs(positions):
            # Cut where `_key` changes, read only now: a parameter given twice has been updated
            # by the run before.
            start = 0
            for part in _cut(run, lambda i, j: self._key(i) == self._key(j)):
                end = start + sum(self.params[i].data.size for i in part)
                self._update(part, data[start:end], grad[start:end])
                start = end

    def _runs(self, positions):
        """`positions` cut into runs of consecutive positions whose parameters lie end to end in
        one buffer: [(run, its data as one flat array, its grad)]. Remembered for the next step
        while the same parameters, bound to the same arrays, are stepped."""
        arrays = [a for i in positions for a in (self.params[i].data, self.params[i].grad)]
        known = self._known_runs
        if (known is None or known[0] != positions or len(known[1]) != len(arrays)
                or any(a is not b for a, b in zip(arrays, known[1]))):
            runs = _cut(positions, self._follows)
            self._known_runs = known = (positions, arrays, [
                (run, *(_span([getattr(self.params[i], a) for i in run]) for a in ("data", "grad")))
                for run in runs])
        return known[2]

    def _follows(self, i, j):
        """Whether parameter j comes right after parameter i, in one buffer."""
        a, b = self.params[i], self.params[j]
        return j == i + 1 and _adjacent(a.data, b.data) and _adjacent(a.grad, b.grad)

    def _state(self, run, name):
        """The entry `name` of the positions `run` as one flat array, made (zeroed) where missing:
        each position's entry is a view of one flat array over all positions, so that consecutive
        positions' entries lie end to end."""
        for i in run:
            entries = self.state.setdefault(i, {})
            if name not in entries:
                entries[name] = self._view(i, name)
                entries[name][...] = 0
        return _span([self.state[i][name] for i in run])

    def _view(self, i, name):
        p = self.params[i]
        key = (name, p.data.dtype)
        if key not in self._flat:
            self._flat[key] = kernels.get().empty(self._offsets[-1], p.data.dtype)
        return self._flat[key][self._offsets[i]:self._offsets[i + 1]].reshape(p.shape)

    def zero_grad(self):
        for p in self.params:
            p.grad[...] = 0

    def state_dict(self):
        """{"num_params": int, "hyper": {name: number or array},
            "state": {position: {name: array, or int for "step"}}}.

        Only numbers and array copies (Adam's betas become a 2-array), so it maps directly onto
        HDF5 attributes and datasets. Positions with no state yet (never stepped) are left out.
        """
        hyper = {k: getattr(self, k) for k in self._hyper_names}
        return {
            "num_params": len(self.params),
            "hyper": {k: np.array(v) if isinstance(v, tuple) else v for k, v in hyper.items()},
            "state": {i: {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in s.items()}
                      for i, s in sorted(self.state.items()) if s},
        }

    def load_state_dict(self, sd):
        """Restore hyperparameters and state; positions may be ints or strings (HDF5 names)."""
        name = type(self).__name__
        if int(sd["num_params"]) != len(self.params):
            raise ValueError(f"{name}.load_state_dict: saved state is for {int(sd['num_params'])} "
                             f"parameters, this optimizer has {len(self.params)}")
        if set(sd["hyper"]) != set(self._hyper_names):
            raise ValueError(f"{name}.load_state_dict: hyperparameters {sorted(sd['hyper'])} "
                             f"do not match {sorted(self._hyper_names)}")
        old = {k: getattr(self, k) for k in self._hyper_names}
        for k, v in sd["hyper"].items():
            setattr(self, k, _like(old[k], v))
        try:
            self._check()
            state = self._parse_state(sd["state"])
        except ValueError:
            for k, v in old.items():
                setattr(self, k, v)
            raise
        self.state = {}
        for i, entries in state.items():
            self.state[i] = {k: v if k == "step" else self._view(i, k) for k, v in entries.items()}
            for k, v in entries.items():
                if k != "step":
                    self.state[i][k][...] = v

    def _parse_state(self, saved):
        name, expected = type(self).__name__, self._state_names()
        state = {}
        for key, entries in saved.items():
            i = int(key)
            if not 0 <= i < len(self.params):
                raise ValueError(f"{name}.load_state_dict: state for parameter {i}, but there are "
                                 f"only {len(self.params)}")
            if set(entries) != expected:
                raise ValueError(f"{name}.load_state_dict: parameter {i} has state "
                                 f"{sorted(entries)}, expected {sorted(expected)}")
            p = self.params[i]
            state[i] = {}
            for k, v in entries.items():
                if k == "step":
                    state[i][k] = int(v)
                elif np.shape(v) != p.shape:
                    raise ValueError(f"{name}.load_state_dict: parameter {i} {k} has shape "
                                     f"{np.shape(v)}, the parameter has {p.shape}")
                else:
                    state[i][k] = np.array(v, dtype=p.data.dtype)
        return state

    def __repr__(self):
        hyper = ", ".join(f"{k}={getattr(self, k)}" for k in self._hyper_names)
        return f"{type(self).__name__}({len(self.params)} params, {hyper})"


def _nonneg(**values):
    for k, v in values.items():
        if not v >= 0:          # NaN too, as PyTorch's `not 0.0 <= v`
            raise ValueError(f"invalid {k}: {v} (must be >= 0)")


def _cut(items, together):
    """`items` cut into lists of neighbours a, b for which `together(a, b)`."""
    parts = [[items[0]]]
    for b in items[1:]:
        if together(parts[-1][-1], b):
            parts[-1].append(b)
        else:
            parts.append([b])
    return parts


def _address(a):
    return a.__array_interface__["data"][0]


def _adjacent(a, b):
    """Whether b starts where a ends, both C-ordered parts of one flat buffer."""
    return (a.base is not None and b.base is a.base and a.base.ndim == 1
            and a.dtype == b.dtype == a.base.dtype and a.flags.c_contiguous and b.flags.c_contiguous
            and _address(b) == _address(a) + a.nbytes)


def _span(arrays):
    """Arrays lying end to end (`_adjacent`), or one C-ordered array, as one flat view that the
    update rules write through (a copy would take their writes away: refused)."""
    first = arrays[0]
    if len(arrays) > 1:
        start = (_address(first) - _address(first.base)) // first.itemsize
        return first.base[start:start + sum(a.size for a in arrays)]
    if not first.flags.c_contiguous:
        raise ValueError(f"a parameter or its state is not in C order (strides {first.strides}): "
                         f"the optimizers update it in place through a flat view")
    return first.reshape(-1)


def _like(current, value):
    """Cast a loaded hyperparameter (maybe a NumPy scalar or array from HDF5) to the current
    attribute's type."""
    if isinstance(current, tuple):
        return tuple(float(x) for x in value)
    return type(current)(value)


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum, as torch.optim.SGD.

    g = grad + weight_decay * p
    buf = g on the first step, else momentum * buf + (1 - dampening) * g
    g = g + momentum * buf if nesterov else buf          (only when momentum != 0)
    p -= lr * g
    """

    def __init__(self, params, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
        super().__init__(params, lr=float(lr), momentum=float(momentum), dampening=float(dampening),
                         weight_decay=float(weight_decay), nesterov=bool(nesterov))

    def _check(self):
        super()._check()
        _nonneg(momentum=self.momentum, dampening=self.dampening)
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("Nesterov momentum requires momentum > 0 and dampening = 0")

    def _state_names(self):
        return {"momentum_buffer"} if self.momentum else set()

    def _key(self, i):
        return "momentum_buffer" in self.state.get(i, ())

    def _update(self, run, data, grad):
        first = bool(self.momentum) and not self._key(run[0])
        buf = self._state(run, "momentum_buffer") if self.momentum else data[:0]
        kernels.get().sgd(data, grad, buf, self.lr, self.momentum, self.dampening,
                          self.weight_decay, self.nesterov, first)


class Adam(Optimizer):
    """Adam (Kingma & Ba), as torch.optim.Adam without amsgrad; bias correction applied once.

    t += 1;  g = grad + weight_decay * p
    m = beta1 * m + (1 - beta1) * g;   v = beta2 * v + (1 - beta2) * g**2
    p -= lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, lr=float(lr), betas=tuple(float(b) for b in betas),
                         eps=float(eps), weight_decay=float(weight_decay))

    def _check(self):
        super()._check()
        _nonneg(eps=self.eps)
        if len(self.betas) != 2:
            raise ValueError(f"invalid betas: {self.betas} (need two values)")
        for i, b in enumerate(self.betas):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"invalid beta at index {i}: {b} (must be in [0, 1))")

    def _state_names(self):
        return {"step", "exp_avg", "exp_avg_sq"}

    def _key(self, i):
        return self.state.get(i, {}).get("step", 0)

    def _update(self, run, data, grad):
        for i in run:
            entries = self.state.setdefault(i, {})
            entries["step"] = entries.get("step", 0) + 1
        exp_avg, exp_avg_sq = self._state(run, "exp_avg"), self._state(run, "exp_avg_sq")
        beta1, beta2 = self.betas
        kernels.get().adam(data, grad, exp_avg, exp_avg_sq, self.lr, beta1, beta2, self.eps,
                           self.weight_decay, float(self.state[run[0]]["step"]))


class RMSprop(Optimizer):
    """RMSprop, as torch.optim.RMSprop (eps added outside the square root).

    g = grad + weight_decay * p;   s = alpha * s + (1 - alpha) * g**2
    centered: a = alpha * a + (1 - alpha) * g;  avg = sqrt(s - a**2) + eps
    otherwise: avg = sqrt(s) + eps
    momentum > 0: buf = momentum * buf + g / avg;  p -= lr * buf;   else p -= lr * g / avg
    """

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                 centered=False):
        super().__init__(params, lr=float(lr), alpha=float(alpha), eps=float(eps),
                         weight_decay=float(weight_decay), momentum=float(momentum),
                         centered=bool(centered))

    def _check(self):
        super()._check()
        _nonneg(alpha=self.alpha, eps=self.eps, momentum=self.momentum)

    def _state_names(self):
        return ({"square_avg"} | ({"momentum_buffer"} if self.momentum else set())
                | ({"grad_avg"} if self.centered else set()))

    def _update(self, run, data, grad):
        square_avg = self._state(run, "square_avg")
        grad_avg = self._state(run, "grad_avg") if self.centered else data[:0]
        buf = self._state(run, "momentum_buffer") if self.momentum else data[:0]
        kernels.get().rmsprop(data, grad, square_avg, grad_avg, buf, self.lr, self.alpha,
                              self.eps, self.weight_decay, self.momentum, self.centered)


# The CLI's optimizers: name -> make(params, lr, momentum, weight_decay). "sgd" and "rmsprop" use
# the momentum; "adam" ignores it (its betas stay PyTorch's defaults). A new one is one line here.
OPTIMIZERS = {
    "sgd": lambda params, lr, momentum, wd: SGD(params, lr, momentum=momentum, weight_decay=wd),
    "adam": lambda params, lr, momentum, wd: Adam(params, lr, weight_decay=wd),
    "rmsprop": lambda params, lr, momentum, wd: RMSprop(params, lr, momentum=momentum,
                                                        weight_decay=wd),
}


def make_optimizer(name, params, lr, momentum=0.0, weight_decay=0.0):
    """The CLI's optimizer `name` (a key of OPTIMIZERS) over `params`."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name](params, lr, momentum, weight_decay)

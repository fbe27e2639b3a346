"""Optimizers, following PyTorch's update rules and defaults (schedules: ddl/schedules.py).

Every update writes `p.data` in place and only reads `p.grad`: the data-parallel wrapper makes
both views into flat buffers, so rebinding either would detach the parameter from it.
Per-parameter state (momentum buffers, Adam moments, ...) is keyed by the parameter's position in
`optimizer.params`, never by `id()`, so a saved state loads into a freshly built model.
The NumPy code below is the reference; with the compiled kernels (ddl.kernels) each update is one
pass of ddl/kernels/optim.py over the parameter instead.
"""
import math

import numpy as np

from ddl import kernels


class Optimizer:
    """Base class: holds the ordered parameter list, the hyperparameters and per-position state.

    Subclasses pass their hyperparameters as keywords (they become plain attributes, so a schedule
    can set `opt.lr`) and implement `_check` (validation), `_state_names` and `_update`.
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
        self._check()

    def _check(self):
        """Raise ValueError on invalid hyperparameters."""
        _nonneg(lr=self.lr, weight_decay=self.weight_decay)

    def _state_names(self):
        """The state entries one parameter has after its first step, under these hyperparameters."""
        raise NotImplementedError

    def _update(self, p, state):
        """Update `p.data` in place from `p.grad`; `state` is this parameter's dict (lazy)."""
        raise NotImplementedError

    def _grad(self, p):
        """The gradient with L2 weight decay folded in (PyTorch's coupled `weight_decay`)."""
        return p.grad + self.weight_decay * p.data if self.weight_decay else p.grad

    def step(self, params=None):
        """Update the given parameters (default: all). Each must be one of `self.params`."""
        for p in self.params if params is None else params:
            i = self._position.get(id(p))
            if i is None:
                raise ValueError(f"{type(self).__name__}.step: {p!r} is not one of the parameters "
                                 "this optimizer was built with")
            self._update(p, self.state.setdefault(i, {}))

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
            self.state = self._parse_state(sd["state"])
        except ValueError:
            for k, v in old.items():
                setattr(self, k, v)
            raise

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


def _unused(p):
    """Stands for state that a compiled update does not use (no momentum, not centered)."""
    return p.data.reshape(-1)[:0]


def _flat(a):
    """A parameter-shaped array as a 1-D view, which the compiled updates write through (a copy
    would take their writes away: refused)."""
    if not a.flags.c_contiguous:
        raise ValueError(f"a parameter or its state is not in C order (strides {a.strides}): "
                         f"the compiled optimizers update it in place through a flat view")
    return a.reshape(-1)


def _compiled():
    from ddl.kernels import optim
    return optim


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

    def _update(self, p, state):
        if kernels.active() == "numba":
            first = self.momentum and "momentum_buffer" not in state
            if first:
                state["momentum_buffer"] = np.empty_like(p.data)
            buf = state.get("momentum_buffer", _unused(p))
            _compiled().sgd(_flat(p.data), _flat(p.grad), _flat(buf), self.lr, self.momentum,
                            self.dampening, self.weight_decay, self.nesterov, bool(first))
            return
        g = self._grad(p)
        if self.momentum:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = np.array(g, copy=True)
            else:
                buf *= self.momentum
                buf += (1 - self.dampening) * g
            g = g + self.momentum * buf if self.nesterov else buf
        p.data -= self.lr * g


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

    def _update(self, p, state):
        if not state:
            state.update(step=0, exp_avg=np.zeros_like(p.data), exp_avg_sq=np.zeros_like(p.data))
        beta1, beta2 = self.betas
        state["step"] += 1
        t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
        if kernels.active() == "numba":
            _compiled().adam(_flat(p.data), _flat(p.grad), _flat(m), _flat(v), self.lr, beta1,
                             beta2, self.eps, self.weight_decay, float(t))
            return
        g = self._grad(p)
        m *= beta1
        m += (1 - beta1) * g
        v *= beta2
        v += (1 - beta2) * g * g
        denom = np.sqrt(v) / math.sqrt(1 - beta2 ** t) + self.eps
        p.data -= (self.lr / (1 - beta1 ** t)) * m / denom


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

    def _update(self, p, state):
        if not state:
            state.update({k: np.zeros_like(p.data) for k in self._state_names()})
        if kernels.active() == "numba":
            _compiled().rmsprop(*(_flat(a) for a in (
                p.data, p.grad, state["square_avg"], state.get("grad_avg", _unused(p)),
                state.get("momentum_buffer", _unused(p)))), self.lr, self.alpha, self.eps,
                self.weight_decay, self.momentum, self.centered)
            return
        g = self._grad(p)
        s = state["square_avg"]
        s *= self.alpha
        s += (1 - self.alpha) * g * g
        if self.centered:
            a = state["grad_avg"]
            a *= self.alpha
            a += (1 - self.alpha) * g
            # s >= a**2 in exact arithmetic; float32 rounding can dip below and give NaN.
            avg = np.sqrt(np.maximum(s - a * a, 0)) + self.eps
        else:
            avg = np.sqrt(s) + self.eps
        if self.momentum:
            buf = state["momentum_buffer"]
            buf *= self.momentum
            buf += g / avg
            p.data -= self.lr * buf
        else:
            p.data -= self.lr * (g / avg)


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

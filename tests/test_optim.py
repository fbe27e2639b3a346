"""Optimizers against their update rules written out by hand; state round trips."""

import numpy as np
import pytest

from ddl.nn.module import Module, Parameter, Sequential
from ddl.optim import SGD, Adam, RMSprop, make_optimizer

pytestmark = pytest.mark.usefixtures("backend")  # NumPy and compiled kernels alike

SHAPES = [(3, 4), (5,)]
STEPS = 5


def initial(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s) for s in SHAPES]


def gradients(steps=STEPS, seed=1):
    """gradients[k][j]: the gradient of parameter j at step k."""
    rng = np.random.default_rng(seed)
    return [[rng.normal(size=s) for s in SHAPES] for _ in range(steps)]


def run(make, steps=STEPS, dtype=np.float64):
    params = [Parameter(x, dtype=dtype) for x in initial()]
    opt = make(params)
    for gs in gradients(steps):
        for p, g in zip(params, gs):
            p.grad[...] = g
        opt.step()
    return params, opt


# --- the rules, by hand, one array at a time ----------------------------------------------------

def sgd_by_hand(x, grads, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
    buf = None
    for g in grads:
        g = g + weight_decay * x
        if momentum:
            buf = g.copy() if buf is None else momentum * buf + (1 - dampening) * g
            g = g + momentum * buf if nesterov else buf
        x = x - lr * g
    return x


def adam_by_hand(x, grads, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    b1, b2 = betas
    m, v = np.zeros_like(x), np.zeros_like(x)
    for t, g in enumerate(grads, start=1):
        g = g + weight_decay * x
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g ** 2
        m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        x = x - lr * m_hat / (np.sqrt(v_hat) + eps)
    return x


def rmsprop_by_hand(x, grads, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                    centered=False):
    s, a, buf = np.zeros_like(x), np.zeros_like(x), np.zeros_like(x)
    for g in grads:
        g = g + weight_decay * x
        s = alpha * s + (1 - alpha) * g ** 2
        if centered:
            a = alpha * a + (1 - alpha) * g
            avg = np.sqrt(s - a ** 2) + eps
        else:
            avg = np.sqrt(s) + eps
        if momentum:
            buf = momentum * buf + g / avg
            x = x - lr * buf
        else:
            x = x - lr * g / avg
    return x


CASES = [
    (SGD, sgd_by_hand, dict(lr=0.1)),
    (SGD, sgd_by_hand, dict(lr=0.1, momentum=0.9)),
    (SGD, sgd_by_hand, dict(lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.01)),
    (SGD, sgd_by_hand, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1)),
    (Adam, adam_by_hand, dict()),
    (Adam, adam_by_hand, dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    (RMSprop, rmsprop_by_hand, dict()),
    (RMSprop, rmsprop_by_hand, dict(lr=0.01, alpha=0.9, momentum=0.5)),
    (RMSprop, rmsprop_by_hand, dict(lr=0.01, centered=True, weight_decay=0.1)),
    (RMSprop, rmsprop_by_hand, dict(lr=0.01, centered=True, momentum=0.9, eps=1e-3)),
]
IDS = [f"{cls.__name__}-{kw}" for cls, _, kw in CASES]


@pytest.mark.parametrize("cls,by_hand,kw", CASES, ids=IDS)
def test_matches_rule_by_hand(cls, by_hand, kw):
    params, _ = run(lambda ps: cls(ps, **kw))
    grads = gradients()
    for j, (p, x0) in enumerate(zip(params, initial())):
        expected = by_hand(x0, [gs[j] for gs in grads], **kw)
        np.testing.assert_allclose(p.data, expected, rtol=1e-12, atol=1e-12)
        assert not np.allclose(p.data, x0)


def test_adam_first_step_moves_by_lr():
    # Bias-corrected once, Adam's first step is lr * g / (|g| + eps): about lr per element.
    # Correcting twice (the 2018 library) would scale it by 1 / (1 - beta1) = 10.
    params, _ = run(lambda ps: Adam(ps, lr=0.01), steps=1)
    for p, x0 in zip(params, initial()):
        np.testing.assert_allclose(np.abs(p.data - x0), 0.01, rtol=1e-5)


@pytest.mark.parametrize("cls,by_hand,kw", CASES, ids=IDS)
def test_float32_stays_float32(cls, by_hand, kw):
    params, opt = run(lambda ps: cls(ps, **kw), dtype=np.float32)
    grads = gradients()
    for j, (p, x0) in enumerate(zip(params, initial())):
        assert p.data.dtype == np.float32 and p.grad.dtype == np.float32
        np.testing.assert_allclose(p.data, by_hand(x0, [gs[j] for gs in grads], **kw),
                                   rtol=1e-4, atol=1e-5)
    for s in opt.state.values():
        assert all(v.dtype == np.float32 for v in s.values() if isinstance(v, np.ndarray))


@pytest.mark.parametrize("cls,kw", [(SGD, dict(lr=0.5, momentum=0.9)), (Adam, {}), (RMSprop, {})])
def test_a_parameter_made_from_a_transposed_array_is_updated(cls, kw):
    """A transposed array is in Fortran order, which np.array keeps: the compiled updates write
    through a flat view of the parameter, which only C order gives."""
    start = np.arange(6.0).reshape(3, 2).T
    p = Parameter(start)
    p.grad[...] = 1
    cls([p], **kw).step()
    assert not np.any(p.data == start)


@pytest.mark.parametrize("cls,kw", [(SGD, dict(lr=0.1, momentum=0.9)), (Adam, {}), (RMSprop, {})])
def test_updates_in_place_into_flat_buffers(cls, kw):
    # What the data-parallel wrapper does: data and grad become views of flat buffers.
    flat_data = np.concatenate([x.ravel() for x in initial()]).astype(np.float32)
    flat_grad = np.ones_like(flat_data)
    params, start = [], 0
    for s in SHAPES:
        p = Parameter(np.zeros(s))
        n = p.data.size
        p.data, p.grad = (flat_data[start:start + n].reshape(s),
                          flat_grad[start:start + n].reshape(s))
        params.append(p)
        start += n
    before = flat_data.copy()
    opt = cls(params, **kw)
    opt.step()
    assert all(np.shares_memory(p.data, flat_data) for p in params)
    assert np.all(flat_data < before)  # every element moved against the all-ones gradient
    np.testing.assert_array_equal(flat_grad, 1)  # the optimizer only reads grads
    opt.zero_grad()
    np.testing.assert_array_equal(flat_grad, 0)
    assert all(np.shares_memory(p.grad, flat_grad) for p in params)


@pytest.mark.parametrize("make,match", [
    (lambda ps: SGD(ps, lr=-0.1), "lr"),
    (lambda ps: SGD(ps, lr=0.1, momentum=-0.5), "momentum"),
    (lambda ps: SGD(ps, lr=0.1, weight_decay=-1e-4), "weight_decay"),
    (lambda ps: SGD(ps, lr=0.1, nesterov=True), "Nesterov"),
    (lambda ps: SGD(ps, lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), "Nesterov"),
    (lambda ps: Adam(ps, lr=-1e-3), "lr"),
    (lambda ps: Adam(ps, lr=float("nan")), "invalid lr: nan"),             # as PyTorch refuses
    (lambda ps: SGD(ps, lr=0.1, momentum=float("nan")), "invalid momentum: nan"),
    (lambda ps: Adam(ps, betas=(1.0, 0.999)), "beta at index 0"),
    (lambda ps: Adam(ps, betas=(0.9, -0.1)), "beta at index 1"),
    (lambda ps: Adam(ps, eps=-1e-8), "eps"),
    (lambda ps: Adam(ps, weight_decay=-1.0), "weight_decay"),
    (lambda ps: RMSprop(ps, alpha=-0.9), "alpha"),
    (lambda ps: RMSprop(ps, eps=-1.0), "eps"),
    (lambda ps: RMSprop(ps, momentum=-0.9), "momentum"),
    (lambda ps: SGD([], lr=0.1), "empty"),
    (lambda ps: SGD(ps + ps[:1], lr=0.1), "more than once"),
])
def test_invalid_hyperparameters(make, match):
    with pytest.raises(ValueError, match=match):
        make([Parameter(x) for x in initial()])


def as_if_from_hdf5(sd):
    """What a checkpoint reader gives back: string positions, NumPy scalars, arrays for tuples."""
    return {"num_params": np.int64(sd["num_params"]),
            "hyper": {k: np.asarray(v) for k, v in sd["hyper"].items()},
            "state": {str(i): {k: np.asarray(v) for k, v in s.items()}
                      for i, s in sd["state"].items()}}


@pytest.mark.parametrize("cls,kw", [(cls, kw) for cls, _, kw in CASES], ids=IDS)
@pytest.mark.parametrize("convert", [lambda sd: sd, as_if_from_hdf5], ids=["dict", "hdf5-like"])
def test_state_dict_round_trip_resumes_exactly(cls, kw, convert):
    grads = gradients(6)

    def feed(params, opt, steps):
        for gs in steps:
            for p, g in zip(params, gs):
                p.grad[...] = g
            opt.step()

    params = [Parameter(x) for x in initial()]
    opt = cls(params, **kw)
    feed(params, opt, grads[:3])
    sd = opt.state_dict()
    for v in list(sd["hyper"].values()) + [v for s in sd["state"].values() for v in s.values()]:
        assert isinstance(v, (int, float, bool, np.ndarray))

    copies = [Parameter(p.data) for p in params]
    resumed = cls(copies, lr=123.0) if cls is SGD else cls(copies)  # other hyper: overwritten
    resumed.load_state_dict(convert(sd))
    feed(params, opt, grads[3:])
    feed(copies, resumed, grads[3:])
    for p, q in zip(params, copies):
        np.testing.assert_array_equal(p.data, q.data)
    assert resumed.state_dict()["hyper"].keys() == sd["hyper"].keys()
    assert all(getattr(resumed, k) == getattr(opt, k) for k in sd["hyper"])


def test_state_dict_is_a_copy():
    params, opt = run(lambda ps: SGD(ps, lr=0.1, momentum=0.9))
    sd = opt.state_dict()
    saved = sd["state"][0]["momentum_buffer"].copy()
    opt.step()
    np.testing.assert_array_equal(sd["state"][0]["momentum_buffer"], saved)


def test_load_state_dict_errors():
    _, opt = run(lambda ps: SGD(ps, lr=0.1, momentum=0.9))
    sd = opt.state_dict()
    one = [Parameter(initial()[0])]
    with pytest.raises(ValueError, match="for 2 parameters, this optimizer has 1"):
        SGD(one, lr=0.1, momentum=0.9).load_state_dict(sd)
    swapped = [Parameter(x) for x in reversed(initial())]
    with pytest.raises(ValueError, match=r"momentum_buffer has shape \(3, 4\)"):
        SGD(swapped, lr=0.1, momentum=0.9).load_state_dict(sd)
    with pytest.raises(ValueError, match="hyperparameters"):
        Adam([Parameter(x) for x in initial()]).load_state_dict(sd)
    bad = {**sd, "state": {0: {"exp_avg": sd["state"][0]["momentum_buffer"]}}}
    with pytest.raises(ValueError, match="expected"):
        SGD([Parameter(x) for x in initial()], lr=0.1, momentum=0.9).load_state_dict(bad)
    target = SGD([Parameter(x) for x in initial()], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="lr"):
        target.load_state_dict({**sd, "hyper": {**sd["hyper"], "lr": -1.0}})
    assert target.lr == 0.1  # a rejected load leaves the optimizer as it was


class Affine(Module):
    """A minimal trainable module: its parameters are all the optimizer needs."""

    def __init__(self, x):
        super().__init__()
        self.w = Parameter(x)


def test_step_of_a_subset_changes_only_those():
    params = [Parameter(x) for x in initial()]
    before = [p.data.copy() for p in params]
    opt = Adam(params, lr=0.1)
    for p in params:
        p.grad[...] = 1.0
    opt.step([params[1]])
    np.testing.assert_array_equal(params[0].data, before[0])
    np.testing.assert_allclose(params[1].data, before[1] - 0.1, rtol=1e-6)
    assert 0 not in opt.state
    with pytest.raises(ValueError, match="not one of the parameters"):
        opt.step([Parameter(np.zeros(3))])


def test_sequential_step_equals_one_full_step():
    # Sequential.step hands each child's parameters to the optimizer in turn: every parameter is
    # still stepped once per iteration, so even Adam's per-parameter step count agrees.
    model = Sequential(*(Affine(x) for x in initial()))
    reference = [Parameter(x) for x in initial()]
    opt_model, opt_ref = Adam(model.parameters(), lr=0.1), Adam(reference, lr=0.1)
    for gs in gradients():
        for p, q, g in zip(model.parameters(), reference, gs):
            p.grad[...] = g
            q.grad[...] = g
        model.step(opt_model)
        opt_ref.step()
    for p, q in zip(model.parameters(), reference):
        np.testing.assert_array_equal(p.data, q.data)


def test_make_optimizer():
    ps = [Parameter(x) for x in initial()]
    sgd = make_optimizer("sgd", ps, lr=0.1, momentum=0.9, weight_decay=1e-4)
    assert (type(sgd), sgd.lr, sgd.momentum, sgd.weight_decay) == (SGD, 0.1, 0.9, 1e-4)
    adam = make_optimizer("adam", ps, lr=1e-3, momentum=0.9)
    assert type(adam) is Adam and adam.betas == (0.9, 0.999)
    rms = make_optimizer("rmsprop", ps, lr=1e-2, momentum=0.5)
    assert type(rms) is RMSprop and rms.momentum == 0.5
    with pytest.raises(ValueError, match="sgd, adam, rmsprop"):
        make_optimizer("lbfgs", ps, lr=1.0)


@pytest.mark.parametrize("cls,kw", [(cls, kw) for cls, _, kw in CASES], ids=IDS)
def test_a_flat_buffers_parameters_are_updated_in_one_call(cls, kw, monkeypatch):
    """Parameters lying end to end in one flat buffer (training's `flatten`) are updated by one
    call of the rule when stepped together, bit for bit as one by one; a step of a subset splits
    Adam's run (its step counts then differ) without changing any result."""
    from ddl import kernels
    from ddl.parallel import flatten
    backend, rule = kernels.get(), cls.__name__.lower()
    calls, run_rule = [], getattr(backend, rule)
    monkeypatch.setattr(backend, rule, lambda data, *args: (calls.append(data.size),
                                                            run_rule(data, *args)))
    flat = Sequential(*(Affine(x) for x in initial()))
    flatten(flat.parameters())
    apart = [Parameter(x) for x in initial()]
    opts = cls(flat.parameters(), **kw), cls(apart, **kw)
    for k, gs in enumerate(gradients()):
        for p, q, g in zip(flat.parameters(), apart, gs):
            p.grad[...] = g
            q.grad[...] = g
        calls.clear()
        if k == 2:
            opts[0].step(flat.parameters()[1:])
            opts[1].step(apart[1:])
        else:
            flat.step(opts[0])
            opts[1].step()
        if k == 0:
            assert calls == [sum(p.data.size for p in apart), *(q.data.size for q in apart)]
    for p, q in zip(flat.parameters(), apart):
        np.testing.assert_array_equal(p.data, q.data)
    sd, reference = opts[0].state_dict(), opts[1].state_dict()
    assert sd["state"].keys() == reference["state"].keys()
    for i, s in sd["state"].items():
        for k, v in s.items():
            np.testing.assert_array_equal(v, reference["state"][i][k])


class OwnStep(Affine):
    def step(self, optimizer):
        self.stepped = True
        super().step(optimizer)


def test_sequential_keeps_a_childs_own_step():
    model = Sequential(Affine(initial()[0]), OwnStep(initial()[1]))
    model.step(SGD(model.parameters(), lr=0.1))
    assert model[1].stepped

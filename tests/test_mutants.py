"""Tests written to kill the mutants that `make mutate` found alive (docs/mutation.md): each
checks a value against one computed here by other means, never a function against itself."""
import math
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

from ddl import nn
from ddl.errors import ReplicaDivergence
from ddl.exchange import WHAT
from ddl.parallel import Replicas, Signals, flatten


class TwoRanks:
    """A communicator of two ranks in one process: the other rank's buffers are given, so every
    collective's result is known beforehand."""
    size, rank = 2, 0
    hosts = ("vm", "vm")

    def __init__(self, other_grads=None, other_buffers=None, other_crc=None, root_data=None,
                 root_buffers=None):
        self.other_grads, self.other_buffers = other_grads, other_buffers or {}
        self.other_crc, self.root_data, self.root_buffers = other_crc, root_data, root_buffers
        self.reduced, self.roots = [], []

    def bcast(self, buf, root=0, what=""):
        self.roots.append(root)
        if self.root_data is not None:
            buf[...] = self.root_data

    def bcast_obj(self, obj, root=0, what=""):
        self.roots.append(root)
        return obj if self.root_buffers is None else self.root_buffers

    def allreduce(self, buf, op="sum", what=""):
        self.reduced.append(what)
        if what == WHAT:
            buf += self.other_grads[:len(buf)]    # a small model's one bucket: the whole buffer
        else:
            buf += self.other_buffers[len(self.reduced) - 2]

    def iallreduce(self, buf, op="sum", what=""):
        self.allreduce(buf, op, what)
        return Done()

    def allgather_obj(self, obj, what=""):
        return [obj, obj if self.other_crc is None else self.other_crc]


class Done:
    """A request that completed when it started."""

    def test(self):
        return True

    def wait(self):
        pass


def model():
    return nn.Sequential(nn.Linear(3, 2, rng=0), nn.ReLU(),
                         nn.Linear(2, 1, rng=1))


def test_flatten_copies_values_into_views_of_two_buffers():
    params = [nn.Parameter(np.arange(6.0).reshape(2, 3)), nn.Parameter([7.0, 8.0])]
    params[0].grad[...] = -np.arange(6.0).reshape(2, 3)
    params[1].grad[...] = [-7.0, -8.0]
    data, grad = flatten(params, spare=3)
    np.testing.assert_array_equal(data, [0, 1, 2, 3, 4, 5, 7, 8])
    assert grad.shape == (11,)
    np.testing.assert_array_equal(grad, [0, 0, 0, 0, -1, -2, -3, -4, -5, -7, -8])  # spare first
    data[...] = 10
    grad[3:] = 20
    for p in params:    # views, not copies
        assert (p.data == 10).all() and (p.grad == 20).all()
    assert params[0].data.shape == (2, 3) and params[1].grad.shape == (2,)


def test_flatten_has_no_spare_floats_unless_asked():
    data, grad = flatten([nn.Parameter(np.ones((2, 2)))])
    assert data.shape == grad.shape == (4,)


def test_two_ranks_average_gradients_and_signals():
    m = model()
    other = np.arange(m_size(m) + 3, dtype=np.float32)
    other[:3] = [3.0, 1.0, 0.0]                  # the signals travel first
    comm = TwoRanks(other_grads=other)
    replicas = Replicas(m, comm)
    replicas.grad[...] = 1.0
    signals = replicas.allreduce_grads(1.0, stop=False, save=True)
    np.testing.assert_allclose(replicas.grad, (1.0 + other[3:]) / 2)
    assert signals == Signals(2.0, True, True)
    assert not signals.diverged
    replicas.zero_grad()
    assert (m.parameters()[0].grad == 0).all() and (replicas.grad == 0).all()


def m_size(m):
    return sum(p.data.size for p in m.parameters())


def test_one_rank_keeps_its_values_and_a_nan_anywhere_diverges():
    m = model()
    replicas = Replicas(m, TwoRanks(other_grads=None))
    replicas.comm.size = 1
    replicas.grad[...] = 3.0
    assert replicas.allreduce_grads(0.5) == Signals(0.5, False, False)
    np.testing.assert_array_equal(replicas.grad, 3.0)
    replicas.grad[1] = np.inf
    signals = replicas.allreduce_grads(0.5, stop=True)
    assert signals.diverged and math.isnan(signals.loss) and signals.stop and not signals.save


def test_rank_0s_weights_and_buffers_win():
    m = nn.Sequential(nn.Conv2d(1, 2, 3, rng=0), nn.BatchNorm2d(2))
    root = np.full(m_size(m), 0.25, np.float32)
    root_buffers = {k: np.full(v.shape, 3, v.dtype) for k, v in m.named_buffers()}
    comm = TwoRanks(root_data=root, root_buffers=root_buffers)
    Replicas(m, comm)
    assert comm.roots == [0, 0]
    for p in m.parameters():
        assert (p.data == 0.25).all()
    for _, value in m.named_buffers():
        assert (value == 3).all()


def test_signals_flags_are_off_unless_set():
    assert Signals(0.5) == (0.5, False, False)


def test_running_statistics_are_averaged_over_ranks():
    m = nn.Sequential(nn.Conv2d(1, 2, 3, rng=0), nn.BatchNorm2d(2))
    buffers = dict(m.named_buffers())
    floats = [v for v in buffers.values() if np.issubdtype(v.dtype, np.floating)]
    before = [v.copy() for v in floats]
    others = [np.full(v.shape, 4.0, v.dtype) for v in floats]
    comm = TwoRanks(other_grads=None, other_buffers=others)
    replicas = Replicas(m, comm)
    comm.reduced.clear()
    comm.reduced.append("start")
    replicas.average_buffers()
    for value, old in zip(floats, before):
        np.testing.assert_allclose(value, (old + 4.0) / 2)
    assert len(comm.reduced) == 1 + len(floats)    # integer counters are not averaged


def test_one_rank_leaves_running_statistics_alone():
    m = nn.Sequential(nn.Conv2d(1, 2, 3, rng=0), nn.BatchNorm2d(2))
    replicas = Replicas(m, TwoRanks())
    replicas.comm.size = 1
    before = {k: v.copy() for k, v in m.named_buffers()}
    replicas.average_buffers()
    for k, v in m.named_buffers():
        np.testing.assert_array_equal(v, before[k])


def test_the_checksum_names_the_odd_rank():
    m = model()
    Replicas(m, TwoRanks()).check()     # identical: no error
    replicas = Replicas(m, TwoRanks(other_crc=zlib.crc32(b"other")))
    with pytest.raises(ReplicaDivergence, match=r"rank\(s\) 1 differ"):
        replicas.check()


@pytest.mark.usefixtures("backend")
def test_centered_rmsprop_survives_a_variance_rounded_below_zero():
    """float32 rounding can leave the running mean of squares a hair below the squared running
    mean; the step must treat that variance as 0 (a step of g / eps), not take its root (NaN)."""
    from ddl import kernels
    data, grad = np.ones(4), np.array([0.0, 0.0, 1e-9, -1e-9])
    square_avg, grad_avg, buf = np.full(4, 0.98), np.ones(4), np.zeros(4)
    kernels.get().rmsprop(data, grad, square_avg, grad_avg, buf, 0.01, 0.99, 1e-3, 0.0, 0.0,
                          True)
    # s = 0.99 * 0.98 + 0.01 g^2 < a^2 = (0.99 + 0.01 g)^2: the variance is clamped to 0
    np.testing.assert_allclose(data, 1 - 0.01 * grad / 1e-3, rtol=1e-12)


def test_optimizer_state_for_one_parameter_past_the_end_is_refused():
    from ddl.optim import SGD
    params = [nn.Parameter(np.ones(3)), nn.Parameter(np.ones(2))]
    sd = SGD(params, lr=0.1, momentum=0.9).state_dict()
    sd["state"] = {2: {"momentum_buffer": np.ones(3)}}     # parameters 0 and 1 only
    with pytest.raises(ValueError, match="state for parameter 2, but there are only 2"):
        SGD(params, lr=0.1, momentum=0.9).load_state_dict(sd)


def test_an_optimizer_finds_its_runs_once_and_again_when_an_array_is_rebound(monkeypatch):
    """The runs of flat buffers are found at the first step and remembered while each parameter
    keeps its arrays; a parameter rebound to a new array is found again and updated there."""
    from ddl import optim
    params = [nn.Parameter(np.ones(3)), nn.Parameter(np.ones(2))]
    flatten(params)
    opt = optim.SGD(params, lr=0.5)
    spans, real_span = [], optim._span
    monkeypatch.setattr(optim, "_span", lambda arrays: spans.append(1) or real_span(arrays))
    for p in params:
        p.grad[...] = 1.0
    opt.step()
    found = len(spans)
    assert found > 0
    opt.step()
    assert len(spans) == found         # remembered
    params[1].data = np.full(2, 7.0)   # rebound: no longer beside parameter 0
    opt.step()
    assert len(spans) > found
    np.testing.assert_array_equal(params[1].data, 6.5)
    np.testing.assert_array_equal(params[0].data, -0.5)


def test_adam_takes_betas_of_zero():
    """[0, 1) as PyTorch's: with betas (0, 0) the first step is lr * g / (|g| + eps)."""
    from ddl.optim import Adam
    p = nn.Parameter(np.array([1.0, 2.0]))
    p.grad[...] = [0.5, -2.0]
    Adam([p], lr=0.1, betas=(0.0, 0.0), eps=0.5).step()
    np.testing.assert_allclose(p.data, [1.0 - 0.1 * 0.5 / 1.0, 2.0 + 0.1 * 2.0 / 2.5], rtol=1e-6)


@pytest.mark.usefixtures("backend")
def test_relu_passes_no_gradient_at_zero():
    """PyTorch's convention, and both backends': the gradient at exactly 0 is 0."""
    relu = nn.ReLU()
    x = np.array([[-1.0, 0.0, 2.0, 0.0]], np.float32)
    np.testing.assert_array_equal(relu.forward(x), [[0, 0, 2, 0]])
    np.testing.assert_array_equal(relu.backward(np.ones_like(x)), [[0, 0, 1, 0]])


def test_default_dropout_drops_about_half_and_doubles_the_rest():
    y = nn.Dropout(rng=0).forward(np.ones((100, 100)))
    assert set(np.unique(y)) == {0.0, 2.0}
    assert 0.45 < (y == 0).mean() < 0.55


def test_default_batchnorm_momentum_moves_running_stats_a_tenth_of_the_way():
    bn = nn.BatchNorm2d(1)
    bn.forward(np.full((2, 1, 2, 2), 5.0))
    np.testing.assert_allclose(bn.running_mean, [0.5], rtol=1e-6)    # 0.9 * 0 + 0.1 * 5


def test_residual_block_convolutions_have_no_bias():
    """ResNet's basic block: BatchNorm's shift follows every convolution, shortcut's too; the
    parameters are the three convolutions' weights and the three BatchNorms' weight and bias."""
    block = nn.ResidualBlock(2, 4, stride=2, rng=0)
    shapes = sorted(p.shape for p in block.parameters())
    assert shapes == sorted([(4, 2, 3, 3), (4, 4, 3, 3), (4, 2, 1, 1)] + [(4,)] * 6)


@pytest.mark.parametrize("name", ["numpy", "numba"])
def test_max_pool_with_relu_against_its_definition(name):
    """The pool that the fused passes call with relu=True: max over each 2x2 window, then
    max(., 0); the gradient reaches only windows whose maximum is positive."""
    from ddl import kernels
    x = np.random.default_rng(0).uniform(-1.5, 1, (2, 3, 4, 6))
    want = np.maximum(x.reshape(2, 3, 2, 2, 3, 2).max(axis=(3, 5)), 0)
    with kernels.using(name):
        backend = kernels.get()
        y, first = backend.maxpool2d_forward(x, (2, 2), (2, 2), relu=True)
        np.testing.assert_array_equal(y, want)
        gx = backend.maxpool2d_backward(np.ones_like(y), first, x, (2, 2), (2, 2))
    assert gx.sum() == (want > 0).sum()


def test_batchnorm_on_one_value_per_channel_keeps_a_finite_running_variance():
    """n = 1 value per channel: the unbiased correction n / (n - 1) is taken as 1, not a
    division by zero."""
    bn = nn.BatchNorm2d(2)
    bn.forward(np.ones((1, 2, 1, 1)))
    np.testing.assert_allclose(bn.running_var, [0.9, 0.9], rtol=1e-6)


def test_parameters_between_two_of_one_buffer_are_their_own_run():
    """[p0, q, p1], p1 lying right after p0 in one buffer and q elsewhere: three runs, each
    updated in its own memory."""
    from ddl.optim import SGD
    p0, q, p1 = nn.Parameter(np.ones(2)), nn.Parameter(np.full(3, 5.0)), nn.Parameter(np.ones(2))
    flatten([p0, p1])
    for p in (p0, q, p1):
        p.grad[...] = 1.0
    SGD([p0, q, p1], lr=0.5).step()
    np.testing.assert_array_equal(p0.data, 0.5)
    np.testing.assert_array_equal(q.data, 4.5)
    np.testing.assert_array_equal(p1.data, 0.5)


def test_make_optimizer_sgd_has_no_momentum_unless_asked():
    from ddl.optim import make_optimizer
    p = nn.Parameter(np.zeros(2))
    opt = make_optimizer("sgd", [p], 0.1)
    for _ in range(2):
        p.grad[...] = 1.0
        opt.step()
    np.testing.assert_allclose(p.data, -0.2)    # with momentum the second step would be longer


def test_a_run_after_a_lone_parameter_is_still_one_call(monkeypatch):
    """[q, p0, p1], p1 right after p0 in one buffer: two backend calls, of 3 and of 2 + 2."""
    from ddl import kernels
    from ddl.optim import SGD
    q, p0, p1 = nn.Parameter(np.ones(3)), nn.Parameter(np.ones(2)), nn.Parameter(np.ones(2))
    flatten([p0, p1])
    backend, calls = kernels.get(), []
    rule = backend.sgd
    monkeypatch.setattr(backend, "sgd", lambda data, *args: (calls.append(data.size),
                                                             rule(data, *args))[1])
    for p in (q, p0, p1):
        p.grad[...] = 1.0
    SGD([q, p0, p1], lr=0.5).step()
    assert calls == [3, 4]
    for p in (q, p0, p1):
        np.testing.assert_array_equal(p.data, 0.5)


def test_a_sequentials_input_gradient_is_its_first_layers():
    seq = nn.Sequential(nn.Conv2d(1, 2, 3, rng=0), nn.ReLU(), nn.Flatten())
    seq.needs_input_grad = False
    assert seq[0].needs_input_grad is False
    assert seq[1].needs_input_grad is True and seq[2].needs_input_grad is True
    assert seq.needs_input_grad is False
    seq[0].needs_input_grad = True
    seq[2].needs_input_grad = False
    assert seq.needs_input_grad is True


@pytest.mark.usefixtures("backend")
def test_a_sequential_plans_once_per_backend_and_layers():
    from ddl import kernels
    seq = nn.Sequential(nn.Conv2d(1, 2, 3, rng=0), nn.MaxPool2d(2), nn.ReLU())
    steps = seq.steps()
    assert seq.steps() is steps     # remembered
    other = "numpy" if kernels.get().name == "numba" else "numba"
    with kernels.using(other):
        assert seq.steps() is not steps


def test_an_empty_sequential_needs_its_input_gradient():
    assert nn.Sequential().needs_input_grad is True


def test_train_without_an_argument_switches_training_back_on():
    seq = nn.Sequential(nn.Dropout(), nn.Sequential(nn.BatchNorm2d(1)))
    seq.eval()
    assert not any(m.training for m in seq.modules())
    seq.train()
    assert all(m.training for m in seq.modules())


def test_repr_nests_children_as_pytorch_does():
    seq = nn.Sequential(nn.Linear(2, 3, rng=0), nn.Sequential(nn.ReLU()))
    assert repr(seq) == ("Sequential(\n  (0): Linear(2, 3, bias=True)\n  (1): Sequential(\n"
                         "    (0): ReLU()\n  )\n)")


def test_state_dict_buffers_are_copies():
    bn = nn.BatchNorm2d(1)
    sd = bn.state_dict()
    bn.forward(np.full((2, 1, 2, 2), 5.0))
    np.testing.assert_array_equal(sd["running_mean"], [0.0])
    assert sd["num_batches_tracked"] == 0


@pytest.mark.parametrize("column", [1, 2, 4])
def test_cross_entropy_of_a_huge_logit_in_any_column(backend, column):
    """The logits shift by their row's maximum wherever it lies (not by the first logit, nor the
    maximum of some columns): exp(1e4) overflows float32 and float64 alike."""
    from ddl.nn import CrossEntropyLoss
    z = np.zeros((1, 5), np.float32)
    z[0, column] = 1e4
    loss = CrossEntropyLoss()
    assert loss(z, np.array([0])) == pytest.approx(1e4, rel=1e-6)
    want = np.zeros((1, 5), np.float32)
    want[0, 0], want[0, column] = -1, 1
    np.testing.assert_allclose(loss.backward(), want, atol=1e-7)


def test_bad_labels_are_named_ten_at_most():
    """The error names the first ten distinct labels out of range, in order, and no more."""
    from ddl.nn import CrossEntropyLoss
    with pytest.raises(ValueError) as refused:
        CrossEntropyLoss()(np.zeros((12, 4), np.float32), np.arange(15, 3, -1))
    assert str(refused.value).endswith(f"got {np.arange(4, 14)}")


@pytest.mark.parametrize("k", [6, 7])      # no output, or "minus one"
def test_a_kernel_larger_than_the_padded_input_is_refused(backend, k):
    conv = nn.Conv2d(1, 1, k, padding=1, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match=f"^kernel {k} larger than padded input 5$"):
        conv(np.zeros((2, 1, 3, 3), np.float32))


def test_a_window_of_255_values_cut_by_relu_passes_no_gradient(backend):
    """255 values, codes 0..254: the code that marks a window cut by the ReLU is none of them."""
    net = nn.Sequential(nn.MaxPool2d((15, 17)), nn.ReLU())
    x = -np.ones((2, 1, 15, 17), np.float32)
    x[1, 0, -1, -1] = 3               # the other image's maximum is the window's last value
    assert net(x).ravel().tolist() == [0, 3]
    want = np.zeros_like(x)
    want[1, 0, -1, -1] = 1
    np.testing.assert_array_equal(net.backward(np.ones((2, 1, 1, 1), np.float32)), want)


def test_max_pooling_windows_past_the_numba_codes_are_refused_on_numba():
    from ddl import kernels
    with kernels.using("numba"), pytest.raises(ValueError, match="16x16.*--kernels numpy"):
        nn.MaxPool2d(16)(np.zeros((1, 1, 16, 16), np.float32))


@pytest.mark.parametrize("c, o, k", [(2, 6, 5), (32, 40, 3)])    # direct, Winograd
def test_numba_convolution_with_the_default_arguments_and_no_bias_is_numpys(c, o, k):
    """Each backend's conv2d_forward/backward with their default arguments (no Workspace, the
    input's gradient asked for), no bias and more output than input channels: the compiled
    backend's results are the NumPy reference's (no bias read past the zeros that stand in for
    it; the peers take the same arguments)."""
    from ddl import kernels
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, c, 6, 6)).astype(np.float32)
    w = rng.standard_normal((o, c, k, k)).astype(np.float32)
    gy = rng.standard_normal((3, o, 6, 6)).astype(np.float32)
    got = []
    for name in ("numba", "numpy"):
        backend = kernels.get(name)
        y, ctx = backend.conv2d_forward(x, w, None, (1, 1), (k // 2, k // 2))
        got.append((y, *backend.conv2d_backward(gy, ctx, w, x.shape, (1, 1), (k // 2, k // 2))))
    for a, b in zip(*got):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


def test_relu_gradient_laid_out_unlike_its_output(backend):
    """A ReLU's output gradient in another memory order than its output (a transposed view):
    each element still meets its own mask."""
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)
    relu = nn.ReLU()
    relu(x)
    gy = np.asfortranarray(np.arange(x.size, dtype=np.float32).reshape(x.shape))
    np.testing.assert_array_equal(relu.backward(gy), np.where(x > 0, gy, 0))


def test_a_nan_in_any_corner_of_a_fused_pooling_window_comes_out(backend):
    """Convolution (3x3, unpadded: each corner pixel reaches one output) then 2x2 max pooling,
    fused on numba: image k has a NaN in corner k, so its corner window holds exactly one NaN,
    at position k of the window, and that window's output is NaN."""
    rng = np.random.default_rng(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, rng=rng), nn.MaxPool2d(2))
    x = rng.standard_normal((4, 1, 6, 6)).astype(np.float32)
    corners = [(0, 0), (0, 5), (5, 0), (5, 5)]          # window positions 0, 1, 2, 3
    for k, (i, j) in enumerate(corners):
        x[k, 0, i, j] = np.nan
    y = net(x)
    for k, (i, j) in enumerate(corners):
        nan = np.zeros((2, 2), bool)
        nan[i // 5, j // 5] = True                   # the pooled corner that the NaN reaches
        for o in range(2):
            np.testing.assert_array_equal(np.isnan(y[k, o]), nan, err_msg=f"image {k}")


def test_the_kernels_run_as_python_under_numba_disable_jit():
    """What `make mutate` relies on for the kernel files: with NUMBA_DISABLE_JIT=1 a kernel is
    the plain Python function, and computes what it computes compiled."""
    code = ("import types, numpy as np\n"
            "from ddl.kernels import pool\n"
            "x = np.array([-1, 0, 2.5], np.float32)\n"
            "y = np.empty_like(x)\n"
            "pool.relu(x, y)\n"
            "print(isinstance(pool.relu, types.FunctionType), y.tolist())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, NUMBA_DISABLE_JIT="1"), timeout=120)
    assert (done.returncode, done.stdout) == (0, "True [0.0, 0.0, 2.5]\n"), done.stderr


def test_numba_1x1_convolution_strided_along_one_axis_only_is_numpys():
    """A 1x1 convolution of stride (2, 1): not the unstrided 1x1 case that needs no panel, in
    either pass."""
    from ddl import kernels
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, 6, 5)).astype(np.float32)
    w = rng.standard_normal((4, 2, 1, 1)).astype(np.float32)
    gy = rng.standard_normal((3, 4, 3, 5)).astype(np.float32)
    got = []
    for name in ("numba", "numpy"):
        backend = kernels.get(name)
        y, ctx = backend.conv2d_forward(x, w, None, (2, 1), (0, 0))
        got.append((y, *backend.conv2d_backward(gy, ctx, w, x.shape, (2, 1), (0, 0))))
    for a, b in zip(*got):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["empty", "zeros"])
def test_numba_workspace_arrays_follow_their_shape_and_dtype(kind):
    """A scratch array asked for again with another shape, or another dtype, is made anew."""
    from ddl.kernels.arrays import Workspace
    ws = Workspace()
    get = getattr(ws, kind)
    assert get("a", (2, 3), np.float32).shape == (2, 3)
    assert get("a", (3, 2), np.float32).shape == (3, 2)
    assert get("a", (3, 2), np.float64).dtype == np.float64
    first = get("a", (3, 2), np.float64)
    assert get("a", (3, 2), np.float64) is first

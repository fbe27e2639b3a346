"""Layers: gradients against finite differences, kernels against plain loops, and the habits
(init, accumulation, train/eval, state_dict) that code elsewhere relies on."""
import math

import numpy as np
import pytest

from ddl import kernels
from ddl.nn import (AvgPool2d, BatchNorm2d, Conv2d, Dropout, Flatten, GlobalAvgPool2d, LeakyReLU,
                    Linear, MaxPool2d, ReLU, Residual, ResidualBlock, Sequential, Sigmoid, Tanh)
from gradcheck import check_module

pytestmark = pytest.mark.usefixtures("backend")  # NumPy and compiled kernels alike


def randn(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def away_from_zero(*shape, seed=0):
    """Values with |v| in [0.1, 2]: finite differences never straddle an activation's kink."""
    rng = np.random.default_rng(seed)
    return rng.choice([-1.0, 1.0], size=shape) * rng.uniform(0.1, 2.0, size=shape)


# --- finite differences: input gradient and every parameter gradient -----------------------------
CONV_CONFIGS = [  # (in, out, kernel, stride, padding, bias, input (N, C, H, W))
    (2, 3, 3, 1, 0, True, (2, 2, 5, 5)),
    (2, 3, 3, 2, 1, True, (2, 2, 6, 6)),  # stride leaves the last padded row/col unvisited
    (3, 2, (2, 3), (2, 1), (1, 0), True, (2, 3, 5, 6)),  # rectangular everything
    (1, 2, 1, 1, 0, False, (3, 1, 4, 3)),
    (2, 2, 5, 1, 2, True, (1, 2, 4, 4)),  # padding as wide as the kernel reach
    (1, 4, (1, 2), 1, 0, True, (2, 1, 3, 4)),  # fewer column rows (3) than channels: other GEMM
]


@pytest.mark.parametrize("cfg", CONV_CONFIGS)
def test_conv2d_gradients(cfg):
    cin, cout, k, s, p, bias, shape = cfg
    conv = Conv2d(cin, cout, k, stride=s, padding=p, bias=bias, rng=np.random.default_rng(1))
    _, params = check_module(conv, randn(*shape))
    assert [name for name, _ in params] == (["weight", "bias"] if bias else ["weight"])


@pytest.mark.parametrize("bias", [True, False])
def test_linear_gradients(bias):
    check_module(Linear(4, 3, bias=bias, rng=np.random.default_rng(2)), randn(5, 4))


@pytest.mark.parametrize("layer, shape", [
    (MaxPool2d(2), (2, 3, 4, 6)),
    (MaxPool2d(2), (2, 2, 5, 5)),  # odd size: last row/col dropped, as PyTorch
    (MaxPool2d(3, stride=2), (2, 2, 7, 6)),  # overlapping windows
    (MaxPool2d((2, 3), stride=(1, 2)), (1, 2, 4, 7)),
    (MaxPool2d(2, stride=3), (2, 2, 8, 7)),  # gaps between windows, a cropped border
    (AvgPool2d(2), (2, 3, 4, 6)),
    (AvgPool2d(2), (1, 2, 5, 3)),
    (AvgPool2d(3, stride=2), (2, 2, 7, 6)),
    (AvgPool2d((2, 3), stride=(1, 2)), (1, 2, 4, 7)),
])
def test_pool_gradients(layer, shape):
    check_module(layer, randn(*shape))  # continuous random values: no ties within eps


@pytest.mark.parametrize("layer", [ReLU(), LeakyReLU(0.1), Tanh(), Sigmoid(), Flatten()])
def test_elementwise_and_flatten_gradients(layer):
    check_module(layer, away_from_zero(3, 2, 3, 2))


@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_gradients(training):
    bn = BatchNorm2d(3)
    bn.weight.data[...] = [0.5, 2.0, -1.0]
    bn.bias.data[...] = [0.1, -0.3, 0.7]
    bn.running_mean[...] = [0.2, -0.1, 0.4]
    bn.running_var[...] = [0.5, 2.0, 1.5]
    bn.train(training)
    check_module(bn, 1.5 + 2 * randn(4, 3, 2, 3))


def test_dropout_gradient_with_fixed_mask():
    drop = Dropout(0.4)

    def same_mask():
        drop.rng = np.random.default_rng(7)

    grad_x, _ = check_module(drop, randn(4, 10), before_forward=same_mask)
    assert 0 < np.count_nonzero(grad_x) < grad_x.size  # the mask really dropped something


def test_global_average_pool_gradients():
    check_module(GlobalAvgPool2d(), randn(3, 4, 5, 2))


def test_residual_gradients_identity_shortcut():
    rng = np.random.default_rng(5)
    block = Residual(Sequential(Conv2d(3, 3, 3, padding=1, rng=rng), Tanh(),
                                Conv2d(3, 3, 1, rng=rng)))
    check_module(block, randn(2, 3, 4, 5))


@pytest.mark.parametrize("cin, cout, stride", [(3, 3, 1), (3, 5, 1), (2, 4, 2)])
@pytest.mark.parametrize("training", [True, False])
def test_residual_block_gradients(cin, cout, stride, training):
    """Both paths, BatchNorm2d in each, batch statistics or running ones; a shortcut projects
    exactly when the shape changes."""
    block = ResidualBlock(cin, cout, stride, rng=np.random.default_rng(6))
    assert (block.shortcut is None) == (cin == cout and stride == 1)
    for bn in (m for m in block.modules() if isinstance(m, BatchNorm2d)):
        bn.running_mean[...] = 0.1
        bn.running_var[...] = 1.5
        bn.weight.data[...] = np.linspace(0.5, 1.5, bn.num_features)
    block.train(training)
    _, params = check_module(block, randn(3, cin, 5, 4))
    names = [name for name, _ in params]
    assert names[:3] == ["body.0.weight", "body.1.weight", "body.1.bias"]
    assert ("shortcut.0.weight" in names) == (block.shortcut is not None)


def test_residual_refuses_paths_of_different_shapes():
    with pytest.raises(ValueError, match=r"the body gives \(2, 4, 3, 3\), the shortcut "
                                         r"\(2, 2, 3, 3\)"):
        Residual(Conv2d(2, 4, 1))(np.zeros((2, 2, 3, 3), np.float32))


def test_small_network_gradients():
    rng = np.random.default_rng(3)
    net = Sequential(Conv2d(2, 3, 3, padding=1, rng=rng), BatchNorm2d(3), LeakyReLU(0.2),
                     MaxPool2d(2), Flatten(), Linear(12, 4, rng=rng), Tanh())
    check_module(net, randn(2, 2, 4, 4))


# --- kernels against obvious loops ---------------------------------------------------------------
def loop_conv2d(x, w, b, stride, padding):
    (sh, sw), (ph, pw) = stride, padding
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    n, _, hp, wp = xp.shape
    o, _, kh, kw = w.shape
    oh, ow = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    y = np.zeros((n, o, oh, ow))
    for i in range(n):
        for c in range(o):
            for r in range(oh):
                for q in range(ow):
                    patch = xp[i, :, r * sh:r * sh + kh, q * sw:q * sw + kw]
                    y[i, c, r, q] = np.sum(patch * w[c]) + (0 if b is None else b[c])
    return y


@pytest.mark.parametrize("cfg", CONV_CONFIGS)
def test_conv2d_matches_loop(cfg):
    cin, cout, k, s, p, bias, shape = cfg
    conv = Conv2d(cin, cout, k, stride=s, padding=p, bias=bias, rng=np.random.default_rng(4))
    x = randn(*shape).astype(np.float32)
    y = conv(x)
    assert y.dtype == np.float32
    b = conv.bias.data if bias else None
    expected = loop_conv2d(x.astype(np.float64), conv.weight.data.astype(np.float64), b,
                           conv.stride, conv.padding)
    assert y.shape == expected.shape
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def loop_maxpool(x, kernel, stride, grad_y):
    """Forward and backward by hand; the gradient goes to the first maximum in row-major order."""
    (kh, kw), (sh, sw) = kernel, stride
    n, c, h, w = x.shape
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    y, dx = np.zeros((n, c, oh, ow)), np.zeros(x.shape)
    for i in range(n):
        for ch in range(c):
            for r in range(oh):
                for q in range(ow):
                    best = None
                    for a in range(kh):
                        for b in range(kw):
                            v = x[i, ch, r * sh + a, q * sw + b]
                            if best is None or v > best[0]:
                                best = (v, r * sh + a, q * sw + b)
                    y[i, ch, r, q] = best[0]
                    dx[i, ch, best[1], best[2]] += grad_y[i, ch, r, q]
    return y, dx


@pytest.mark.parametrize("kernel, stride, shape", [
    (2, None, (2, 3, 6, 8)), (2, None, (1, 2, 7, 5)), (3, 2, (2, 2, 9, 7)),
    ((3, 2), (1, 2), (1, 2, 5, 6)), (2, 3, (1, 2, 8, 7)),
])
def test_maxpool_ties_go_to_first_maximum(kernel, stride, shape):
    rng = np.random.default_rng(5)
    x = rng.integers(0, 2, size=shape).astype(np.float32)  # mostly tied windows, like MNIST
    x[0, 0] = 0  # whole all-zero planes too
    pool = MaxPool2d(kernel, stride)
    y = pool(x)
    grad_y = rng.uniform(1, 2, size=y.shape).astype(np.float32)
    dx = pool.backward(grad_y)
    y_ref, dx_ref = loop_maxpool(x, pool.kernel_size, pool.stride, grad_y)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-6)
    assert dx.dtype == np.float32
    if stride is None:  # non-overlapping: exactly one receiving element per window
        assert np.count_nonzero(dx) == y.size
        kh, kw = pool.kernel_size
        np.testing.assert_allclose(dx[0, 0, :y.shape[2] * kh:kh, :y.shape[3] * kw:kw], grad_y[0, 0])


# --- dtype, accumulation, in-place gradients -----------------------------------------------------
ALL_LAYERS = [
    lambda: Linear(12, 3), lambda: Conv2d(3, 2, 3, padding=1), lambda: MaxPool2d(2),
    lambda: AvgPool2d(2), lambda: ReLU(), lambda: LeakyReLU(), lambda: Tanh(), lambda: Sigmoid(),
    lambda: Flatten(), lambda: Dropout(0.5, rng=0), lambda: BatchNorm2d(3),
    lambda: GlobalAvgPool2d(), lambda: ResidualBlock(3, 3), lambda: ResidualBlock(3, 4, 2),
]


@pytest.mark.parametrize("make", ALL_LAYERS)
def test_float32_preserved(make):
    layer = make()
    x = randn(2, 12).astype(np.float32) if isinstance(layer, Linear) else (
        randn(2, 3, 4, 4).astype(np.float32))
    y = layer(x)
    gx = layer.backward(np.ones_like(y))
    assert y.dtype == np.float32 and gx.dtype == np.float32 and gx.shape == x.shape
    assert all(p.data.dtype == p.grad.dtype == np.float32 for p in layer.parameters())


@pytest.mark.parametrize("make, shape", [
    (lambda: Linear(4, 3), (5, 4)), (lambda: Conv2d(2, 3, 3, stride=2, padding=1), (2, 2, 5, 5)),
    (lambda: BatchNorm2d(2), (3, 2, 2, 2)),
])
def test_gradients_accumulate_in_place_until_zero_grad(make, shape):
    layer = make()
    x = randn(*shape).astype(np.float32)
    grad_y = randn(*layer(x).shape, seed=1).astype(np.float32)
    grads = [p.grad for p in layer.parameters()]
    layer.backward(grad_y)
    once = [g.copy() for g in grads]
    assert all(np.any(g != 0) for g in once)
    layer(x)
    layer.backward(grad_y)
    for p, g, g1 in zip(layer.parameters(), grads, once):
        assert p.grad is g  # never rebound: the data-parallel wrapper holds views of these
        np.testing.assert_allclose(g, 2 * g1, rtol=1e-5, atol=1e-6)
    layer.zero_grad()
    assert all(p.grad is g and not np.any(g) for p, g in zip(layer.parameters(), grads))


# --- initialisation -------------------------------------------------------------------------------
def test_init_seeded_bounded_float32():
    for make, fan_in in [(lambda r: Linear(50, 40, rng=r), 50),
                         (lambda r: Conv2d(3, 16, (3, 5), rng=r), 3 * 3 * 5)]:
        a, b, c = make(np.random.default_rng(0)), make(np.random.default_rng(0)), make(
            np.random.default_rng(1))
        bound = 1 / math.sqrt(fan_in)
        for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters()):
            assert pa.data.dtype == np.float32
            np.testing.assert_array_equal(pa.data, pb.data)
            assert not np.array_equal(pa.data, pc.data)
            assert np.abs(pa.data).max() <= bound
        assert np.abs(a.weight.data).max() > 0.9 * bound  # the whole range is used, not a sliver
        # weight first, then bias, from the one generator (PyTorch's order)
        rng = np.random.default_rng(0)
        np.testing.assert_array_equal(a.weight.data, rng.uniform(-bound, bound, a.weight.shape)
                                      .astype(np.float32))
        np.testing.assert_array_equal(a.bias.data, rng.uniform(-bound, bound, a.bias.shape)
                                      .astype(np.float32))


# --- BatchNorm ------------------------------------------------------------------------------------
def test_batchnorm_train_uses_batch_stats_and_updates_running_stats():
    bn = BatchNorm2d(3, momentum=0.1)
    names = [k for k, _ in bn.named_buffers()]
    assert names == ["running_mean", "running_var", "num_batches_tracked"]
    x = (3 + 2 * randn(8, 3, 4, 5)).astype(np.float32)
    bn.running_mean[...] = 100  # must not leak into training outputs
    y = bn(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(y.var(axis=(0, 2, 3)), 1, rtol=1e-3)
    per_channel = x.transpose(1, 0, 2, 3).reshape(3, -1).astype(np.float64)
    np.testing.assert_allclose(bn.running_mean, 0.9 * 100 + 0.1 * per_channel.mean(1), rtol=1e-6)
    np.testing.assert_allclose(bn.running_var, 0.9 * 1 + 0.1 * per_channel.var(1, ddof=1),
                               rtol=1e-5)
    assert bn.num_batches_tracked.shape == () and bn.num_batches_tracked.dtype == np.int64
    bn(x)
    assert bn.num_batches_tracked == 2


def test_batchnorm_eval_uses_running_stats_only():
    bn = BatchNorm2d(2, eps=1e-3)
    bn.weight.data[...] = [2.0, 0.5]
    bn.bias.data[...] = [1.0, -1.0]
    bn.running_mean[...] = [0.5, -2.0]
    bn.running_var[...] = [4.0, 0.25]
    x = randn(3, 2, 2, 2).astype(np.float32)
    y = bn.eval()(x)
    shape = (1, 2, 1, 1)
    expected = ((x - bn.running_mean.reshape(shape)) / np.sqrt(bn.running_var.reshape(shape) + 1e-3)
                * bn.weight.data.reshape(shape) + bn.bias.data.reshape(shape))
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.running_mean, [0.5, -2.0])  # eval leaves them alone
    assert bn.num_batches_tracked == 0
    single = bn(x[:1])  # per-sample in eval: a batch of one gives the same answer
    np.testing.assert_allclose(single, y[:1], rtol=1e-6)


# --- Dropout --------------------------------------------------------------------------------------
def test_dropout_train_eval_and_seeding():
    x = np.ones((200, 500), dtype=np.float32)
    drop = Dropout(0.3, rng=0)
    assert isinstance(drop.rng, np.random.Generator)
    y = drop(x)
    kept = y != 0
    assert abs(kept.mean() - 0.7) < 0.01
    np.testing.assert_allclose(y[kept], 1 / 0.7, rtol=1e-6)
    assert y.dtype == np.float32
    g = drop.backward(np.full_like(x, 2))
    np.testing.assert_array_equal(g != 0, kept)  # backward reuses the forward mask
    np.testing.assert_array_equal(Dropout(0.3, rng=np.random.default_rng(0))(x), y)
    assert not np.array_equal(Dropout(0.3, rng=1)(x), y)
    assert not np.array_equal(drop(x), y)  # the generator moves on
    drop.eval()
    np.testing.assert_array_equal(drop(x), x)
    np.testing.assert_array_equal(drop.backward(x), x)


# --- state_dict -----------------------------------------------------------------------------------
def make_net(seed):
    rng = np.random.default_rng(seed)
    return Sequential(Conv2d(1, 4, 3, padding=1, rng=rng), BatchNorm2d(4), ReLU(), MaxPool2d(2),
                      Flatten(), Linear(4 * 3 * 3, 10, rng=rng))


EXPECTED_STATE = {  # what PyTorch's nn.Sequential of the same layers reports
    "0.weight": (4, 1, 3, 3), "0.bias": (4,),
    "1.weight": (4,), "1.bias": (4,), "1.running_mean": (4,), "1.running_var": (4,),
    "1.num_batches_tracked": (),
    "5.weight": (10, 36), "5.bias": (10,),
}


def test_state_dict_names_shapes_and_round_trip():
    a, b = make_net(0), make_net(1)
    x = randn(2, 1, 6, 6).astype(np.float32)
    a(x)  # move a's running stats and counter off their initial values
    state = a.state_dict()
    assert {k: v.shape for k, v in state.items()} == EXPECTED_STATE
    data_before = [p.data for p in b.parameters()]
    b.load_state_dict(state)
    assert all(p.data is d for p, d in zip(b.parameters(), data_before))  # loaded in place
    assert b[1].num_batches_tracked == 1
    np.testing.assert_array_equal(a.eval()(x), b.eval()(x))
    state["0.weight"][...] = 0  # a state_dict is a copy, not a view
    assert np.any(a[0].weight.data)


def test_load_state_dict_names_every_bad_key():
    net = make_net(0)
    state = net.state_dict()
    del state["1.running_var"]
    state["7.weight"] = np.zeros(3)
    state["5.bias"] = np.zeros(11)
    with pytest.raises(KeyError) as err:
        net.load_state_dict(state)
    msg = str(err.value)
    assert "1.running_var" in msg and "7.weight" in msg and "5.bias" in msg


def test_to_float64_keeps_counter_integer():
    bn = BatchNorm2d(2).to(np.float64)
    assert bn.running_mean.dtype == np.float64 and bn.weight.grad.dtype == np.float64
    assert bn.num_batches_tracked.dtype == np.int64


# --- the fast paths' contracts: memory order and the skipped input gradient -----------------------
def memory_order(a):
    """Axes from outermost to innermost in memory (ties broken by position)."""
    return tuple(sorted(range(a.ndim), key=lambda i: -abs(a.strides[i])))


def test_layers_keep_their_inputs_memory_order():
    """A slow transposing copy between layers is invisible to every value test: check that each
    output and each input gradient keeps its input's memory order (see ddl/kernels/numpy.py)."""
    rng = np.random.default_rng(6)
    net = Sequential(Conv2d(1, 4, 3, rng=rng), ReLU(), MaxPool2d(2), Conv2d(4, 6, 3, rng=rng),
                     ResidualBlock(6, 6, rng=rng), ResidualBlock(6, 8, 2, rng=rng), ReLU(),
                     MaxPool2d(2), ReLU(), Flatten(), Linear(8 * 2 * 2, 3, rng=rng))
    h = randn(5, 1, 22, 22).astype(np.float32)
    inputs = []
    for layer in net:
        inputs.append(h)
        h = layer(h)
        if isinstance(layer, (ReLU, MaxPool2d, ResidualBlock)):
            assert memory_order(h) == memory_order(inputs[-1]), layer
    assert np.shares_memory(inputs[-1], inputs[-2])  # Flatten of conv memory is a view
    g = np.ones_like(h)
    for layer, x in zip(reversed(list(net)), reversed(inputs)):
        g = layer.backward(g)
        if not isinstance(layer, Conv2d):
            assert memory_order(g) == memory_order(x), layer


def test_conv2d_without_input_gradient():
    x = randn(2, 2, 6, 6).astype(np.float32)
    full, first = (Conv2d(2, 3, 3, rng=np.random.default_rng(8)) for _ in range(2))
    first.needs_input_grad = False
    grad_y = randn(*full(x).shape, seed=1).astype(np.float32)
    first(x)
    assert full.backward(grad_y) is not None and first.backward(grad_y) is None
    for p, q in zip(full.parameters(), first.parameters()):
        np.testing.assert_array_equal(p.grad, q.grad)


def test_global_average_pool_keeps_memory_order():
    x = randn(5, 1, 6, 6).astype(np.float32)
    h = Conv2d(1, 4, 3)(x)                              # (C, H, W, N) memory
    pool = GlobalAvgPool2d()
    pool(h)
    assert memory_order(pool.backward(np.ones((5, 4), np.float32))) == memory_order(h)


# --- hooks ----------------------------------------------------------------------------------------
def test_hooks_see_every_module_fused_or_not():
    """add_hook reports each module's forward and backward once, innermost first, whether the
    compiled kernels fuse a group (Fused calls Conv2d.run; the pool and ReLU never run alone)."""
    rng = np.random.default_rng(7)
    net = Sequential(Conv2d(1, 4, 3, rng=rng), MaxPool2d(2), ReLU(), ResidualBlock(4, 4, rng=rng),
                     Flatten(), Linear(4 * 3 * 3, 2, rng=rng))
    names = {id(m): name for name, m in net.named_modules()}
    seen = []
    net.add_hook(lambda m, direction, out: seen.append((names[id(m)], direction, out.shape)))
    x = randn(2, 1, 8, 8).astype(np.float32)
    y = net(x)
    forward = [(n, s) for n, d, s in seen if d == "forward"]
    assert forward[0] == ("0", (2, 4, 3, 3) if kernels.get().name == "numba" else (2, 4, 6, 6))
    assert ("3.body.0", (2, 4, 3, 3)) in forward and ("3.body", (2, 4, 3, 3)) in forward
    assert forward.index(("3.body.0", (2, 4, 3, 3))) < forward.index(("3", (2, 4, 3, 3)))
    assert forward[-1] == ("", (2, 2)) and len(forward) == len(set(forward))
    seen.clear()
    net.backward(np.ones_like(y))
    backward = [n for n, d, _ in seen if d == "backward"]
    assert backward[0] == "5" and backward[-1] == "" and "3.shortcut" not in backward
    assert {"3.body.4", "3.body", "3"} <= set(backward)

"""The compiled kernels against the NumPy reference and finite differences, on odd shapes; the
fused layer groups; numba's cache and the ahead-of-time compilation."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from ddl import kernels, nn
from ddl.kernels import convplan, direct, jit
from ddl.kernels import numba as compiled
from ddl.kernels.arrays import pair
from conftest import MNIST, needs, run
from ddl.models import MODELS, build
from ddl.kernels.numba import Fused
from gradcheck import check_module, numerical_grad

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def kinds(steps):
    """Each step's layer type, with the options of a fused pass: "Conv2d(pool+relu)"."""
    return [type(s.layer).__name__ + "(" + "+".join(k for k, v in s.options.items() if v) + ")"
            if isinstance(s, Fused) else type(s).__name__ for s in steps]


# A batch whose output rows of 15 pixels (15 x N values) span two of the kernels' chunks.
TWO_CHUNKS = int(direct.CHUNK) // 15 + 5
# (in, out, kernel, stride, padding, input (N, C, H, W)), covering each algorithm
CONVS = {
    "single": [(1, 4, 3, 1, 0, (2, 1, 7, 6)), (1, 3, 5, 1, 2, (1, 1, 6, 5)),
               (1, 5, (2, 3), 1, (1, 0), (17, 1, 9, 8)),        # odd batch, rectangular taps
               (1, 2, 4, 1, 1, (3, 1, 11, 9))],      # odd pooled sides, an even kernel
    "direct": [(2, 3, (2, 3), 1, (1, 0), (3, 2, 5, 6)), (3, 2, 3, 1, 1, (2, 3, 4, 4)),
               (6, 2, 5, 1, 0, (2, 6, 7, 7)), (16, 3, 3, 1, 1, (2, 16, 5, 4)),
               (33, 7, 3, 1, 1, (3, 33, 4, 5)),                 # many inputs, few outputs
               (5, 6, 3, 1, 1, (TWO_CHUNKS, 5, 3, 15))],
    "winograd": [(32, 64, 3, 1, 0, (2, 32, 6, 6)), (33, 65, 3, 1, 1, (1, 33, 5, 7)),  # odd outputs
                 (32, 64, 3, 1, 2, (1, 32, 3, 4)), (34, 66, 3, 1, 0, (2, 34, 3, 3))],  # one output
    "strided": [(2, 3, 3, 2, 1, (2, 2, 6, 6)), (3, 2, (2, 3), (2, 1), (1, 0), (2, 3, 5, 6)),
                (3, 4, 3, 2, 1, (2, 3, 7, 5)), (2, 3, 3, 3, 2, (1, 2, 8, 7)),    # odd sides
                (5, 7, 3, 2, 0, (3, 5, 7, 9)),          # two blocks of outputs, the last short
                (3, 8, 3, 2, 1, (1, 3, 5, 5)),          # two full blocks, one image
                (2, 3, 5, 2, 2, (2, 2, 9, 8)),          # taps past the weight gradient's three
                (4, 3, 3, (1, 2), 1, (2, 4, 5, 6)),
                (2, 2, 3, 2, 3, (2, 2, 4, 5)),          # padded by the kernel's size
                (2, 3, 3, 2, 1, (TWO_CHUNKS, 2, 3, 29)),
                (2, 3, (3, 5), (2, 1), (1, 2), (2, 2, 7, 6))],  # 5 taps a row, of one phase
    "gemm": [(6, 2, 1, 1, 0, (2, 6, 3, 4)), (3, 4, 1, 2, 0, (2, 3, 5, 7)),
             (2, 3, 1, (2, 3), 0, (1, 2, 6, 7)), (3, 2, 1, 1, 1, (2, 3, 4, 4)),  # padded 1x1
             (3, 2, 1, 2, 1, (2, 3, 5, 5)), (32, 3, 3, 2, 1, (1, 32, 4, 5)),   # many inputs
             (2, 3, 3, 1, (3, 2), (2, 2, 4, 5))],   # padded by the kernel's size: not direct
}
CONV_CASES = [(algo, cfg) for algo, cfgs in CONVS.items() for cfg in cfgs]


def randn(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def make_conv(cfg, seed=1):
    cin, cout, k, s, p, _ = cfg
    return nn.Conv2d(cin, cout, k, stride=s, padding=p, rng=np.random.default_rng(seed))


def run_both(make, x, grad_y_seed=2, dtype=np.float64):
    """forward and backward of a fresh module from `make()` under each kernel set:
    {name: (y, grad_x, [parameter gradients])}."""
    out = {}
    for name in kernels.NAMES:
        with kernels.using(name):
            module = make().to(dtype)
            y = module.forward(x.astype(dtype))
            grad_y = randn(*y.shape, seed=grad_y_seed).astype(dtype)
            grad_x = module.backward(grad_y)
            out[name] = (y, grad_x, [p.grad.copy() for p in module.parameters()])
    return out


def assert_same(out, tol=1e-10):
    """Each array of the numba run equals the NumPy run's within tol x the latter's largest
    magnitude (float rounding differs with the order of the sums)."""
    (y, gx, gp), (y2, gx2, gp2) = out["numba"], out["numpy"]
    assert (gx is None) == (gx2 is None)
    pairs = [("output", y, y2)] + ([("input gradient", gx, gx2)] if gx2 is not None else [])
    pairs += [(f"parameter gradient {i}", a, b) for i, (a, b) in enumerate(zip(gp, gp2))]
    for what, a, b in pairs:
        assert a.shape == b.shape and a.dtype == b.dtype, what
        np.testing.assert_allclose(a, b, rtol=0, atol=tol * np.abs(b).max(), err_msg=what)


# --- convolutions -------------------------------------------------------------------------------
@pytest.mark.parametrize("algo, cfg", CONV_CASES)
def test_conv_algorithm_matches_numpy(algo, cfg):
    conv = make_conv(cfg)
    assert compiled.algorithm(conv.weight.shape, conv.stride, conv.padding) == algo
    assert_same(run_both(lambda: make_conv(cfg), randn(*cfg[-1])))


def test_strided_fits_strides_above_one_of_kernels_larger_than_1x1():
    from ddl.kernels import strided
    assert strided.fits((3, 2, 2, 1), (2, 2), (0, 0)) and strided.fits((3, 2, 1, 3), (1, 2), (0, 0))
    assert not strided.fits((3, 2, 1, 1), (2, 2), (0, 0))        # one GEMM's panel: gemm.py
    assert not strided.fits((3, 2, 3, 3), (1, 1), (1, 1))


def test_strided_kernels_compiled_ahead_are_the_named_models():
    """`warm` compiles the phase kernels for strided.COMMON, registered when the module is
    imported: every strided layer of a named model (on MNIST) must find its size there."""
    from ddl.kernels import strided
    sizes = {(pair(layer.kernel_size), pair(layer.stride))
             for name in MODELS for layer in build(name, *MNIST).modules()
             if isinstance(layer, nn.Conv2d) and compiled.algorithm(
                 layer.weight.shape, layer.stride, layer.padding) == "strided"}
    assert sizes == set(strided.COMMON)
    made = subprocess.run([sys.executable, "-c", "from ddl.kernels import strided as s; print("
                           "s.forward_kernel.cache_info().currsize, "
                           "s.weight_grad_kernel.cache_info().currsize)"],
                          capture_output=True, text=True, check=True).stdout.split()
    assert made == [str(len(strided.COMMON))] * 2


def planned(cfg, pool=False):
    """The convplan.Conv of the layer in `cfg` on its input, in float64."""
    cin, cout, k, s, p, x_shape = cfg
    return convplan.Conv((cout, cin, *pair(k)), pair(s), pair(p), x_shape, "float64", pool)


# Every algorithm that fits each shape, as a plan or $DDL_CONV_ALGORITHM may choose it.
FORCED = [(name, cfg) for _, cfg in CONV_CASES for name in compiled.candidates(planned(cfg))]


@pytest.mark.parametrize("name, cfg", FORCED)
def test_each_algorithm_that_fits_matches_numpy(name, cfg, monkeypatch):
    monkeypatch.setenv(convplan.FORCE, name)
    made = []
    out = run_both(lambda: made.append(make_conv(cfg)) or made[-1], randn(*cfg[-1]))
    assert made[0]._ctx[0] == name          # the numba run's layer (kernels.NAMES: first)
    assert_same(out)


def test_aligned_arrays_start_on_a_cache_line():
    from ddl.kernels import arrays
    for make in (arrays.empty, arrays.zeros):
        for shape, dtype in (((3, 5, 7), np.float32), ((13,), np.uint8), ((2, 1, 3), np.float64),
                             (9, np.float32)):
            for _ in range(4):          # malloc's 16-byte alignment: some would start a line
                a = make(shape, dtype)
                assert a.ctypes.data % arrays.ALIGN == 0
                assert a.shape == np.empty(shape).shape and a.dtype == dtype
                assert a.flags.c_contiguous and a.flags.writeable
    assert not arrays.zeros((64, 1000), np.float32).any()
    x = np.zeros((2, 3, 4, 5), np.float32).transpose(3, 0, 1, 2)  # (C, H, W, N) as (N, C, H, W)
    y = arrays.empty_like(x)
    assert (y.shape, y.strides, y.dtype) == (x.shape, x.strides, x.dtype)
    assert y.ctypes.data % arrays.ALIGN == 0


# A training step's allocations: activations of several MB made in the forward pass and freed in
# the backward, in the reverse order; the page faults of three such steps after three others.
STEP_FAULTS = """
import resource, sys
from ddl.kernels import arrays
if sys.argv[1] == "keep":
    assert arrays.keep_freed_memory()
def step():
    held = []
    for mb in (8, 3, 8, 16, 2, 8, 1):
        held.append(arrays.empty((mb << 18,), "float32"))
        held[-1][:] = 1
    while held:
        held.pop()
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_freed_memory_is_kept_for_the_next_step():
    def faults(mode):       # fresh processes: the setting is for the whole process
        return int(subprocess.run([sys.executable, "-c", STEP_FAULTS, mode], check=True,
                                  capture_output=True, text=True, cwd=ROOT).stdout)
    # 46 MB a step is 11,776 pages: by default glibc hands most of them back every step
    default, kept = faults("default"), faults("keep")
    assert default > 5000 and kept < 100, (default, kept)


@pytest.mark.parametrize("name, cfg", [(name, (16, 16, 3, s, 1, (16, 16, 6, 6))) for name, s in
                                       (("direct", 1), ("winograd", 1), ("gemm", 1),
                                        ("strided", 2), ("gemm", 2))])
def test_numba_convolutions_return_arrays_on_cache_lines(name, cfg, monkeypatch):
    """What one compiled layer writes and the next reads starts on a cache line (a 64-byte
    vector load across two lines is the slow case), in both passes."""
    from ddl.kernels import arrays
    monkeypatch.setenv(convplan.FORCE, name)
    with kernels.using("numba"):
        conv = make_conv(cfg).to(np.float32)
        y = conv.forward(randn(*cfg[-1]).astype(np.float32))
        gx = conv.backward(np.ones_like(y))
    assert conv._ctx[0] == name
    assert y.ctypes.data % arrays.ALIGN == 0 and gx.ctypes.data % arrays.ALIGN == 0


@pytest.mark.parametrize("name", ["gemm", "direct", "winograd"])
def test_float32_each_algorithm_close_to_numpy(name, monkeypatch):
    monkeypatch.setenv(convplan.FORCE, name)
    x = randn(16, 32, 9, 9).astype(np.float32)
    out = run_both(lambda: nn.Conv2d(32, 64, 3, padding=1, rng=np.random.default_rng(3)), x,
                   dtype=np.float32)
    assert_same(out, tol=1e-5)


@pytest.mark.parametrize("algo, cfg", CONV_CASES)
def test_conv_algorithm_finite_differences(algo, cfg):
    with kernels.using("numba"):
        check_module(make_conv(cfg), randn(*cfg[-1]))


@pytest.mark.parametrize("algo, cfg", CONV_CASES)
def test_conv_without_input_gradient(algo, cfg):
    def make():
        conv = make_conv(cfg)
        conv.needs_input_grad = False
        return conv
    out = run_both(make, randn(*cfg[-1]))
    assert out["numba"][1] is None
    assert_same(out)


@pytest.mark.parametrize("kernel, stride, padding, shape", [
    ((3, 3), (2, 2), (1, 1), (5, 7, 6, 3)), ((2, 3), (2, 1), (1, 0), (2, 5, 6, 2)),
    ((3, 3), (3, 3), (2, 2), (2, 8, 7, 1)), ((1, 1), (2, 2), (0, 0), (3, 5, 7, 2))])
def test_fold_writes_every_pixel_as_unpack_adds_into_zeros(kernel, stride, padding, shape):
    """strided.fold's gather against gemm.unpack_add's scatter, into an input gradient full of
    NaN, which every pixel must overwrite (those that no tap reaches with zeros)."""
    from ddl.kernels import gemm, strided
    from ddl.kernels.arrays import out_size
    out_hw = [out_size(*a) for a in zip(shape[1:3], kernel, stride, padding)]
    gcols = randn(shape[0] * kernel[0] * kernel[1], *out_hw, shape[3])
    expected, gx = np.zeros(shape), np.full(shape, np.nan)
    gemm.unpack_add(gcols, *kernel, *stride, *padding, expected)
    strided.fold(gcols, *kernel, *stride, *padding, gx)
    np.testing.assert_allclose(gx, expected, rtol=1e-12, atol=1e-12)


def test_float32_conv_close_to_numpy():
    x = randn(64, 32, 13, 13).astype(np.float32)      # ref-cnn's second layer, Winograd
    out = run_both(lambda: nn.Conv2d(32, 64, 3, rng=np.random.default_rng(3)), x,
                   dtype=np.float32)
    assert_same(out, tol=1e-5)


# --- fused groups ---------------------------------------------------------------------------------
def conv_pool(order, cfg, relu=True):
    """A Sequential of the conv in `cfg` and a 2x2 max pool, with a ReLU where `order` says."""
    def make():
        layers = {"pool": nn.MaxPool2d(2), "relu": nn.ReLU()}
        return nn.Sequential(make_conv(cfg), *(layers[k] for k in order))
    return make


# Algorithms that fuse, and room to pool.
FUSED = [c for c in CONV_CASES
         if c[0] in ("single", "direct", "winograd") and min(c[1][-1][2:]) > 3]


@pytest.mark.parametrize("order", [("pool", "relu"), ("relu", "pool"), ("pool",)])
@pytest.mark.parametrize("algo, cfg", FUSED)
def test_conv_pool_relu_fuse_and_match_numpy(algo, cfg, order):
    make = conv_pool(order, cfg)
    with kernels.using("numba"):
        assert kinds(make().steps()) == ["Conv2d(pool+relu)" if "relu" in order else "Conv2d(pool)"]
    x = randn(*cfg[-1])
    x[..., :2, :] = 0     # flat regions: tied windows, and ReLU cutting whole windows
    assert_same(run_both(make, x))
    with kernels.using("numba"):
        check_module(make(), randn(*cfg[-1], seed=4))


@pytest.mark.parametrize("name, cfg", [(name, cfg) for _, cfg in FUSED
                                       for name in compiled.candidates(planned(cfg, True))])
def test_each_fusing_algorithm_matches_numpy(name, cfg, monkeypatch):
    """A pooled layer's candidates are the algorithms that fuse the pool (never gemm)."""
    monkeypatch.setenv(convplan.FORCE, name)
    made = []
    out = run_both(lambda: made.append(conv_pool(("pool", "relu"), cfg)()) or made[-1],
                   randn(*cfg[-1]))
    assert kinds(made[0].steps()) == ["Conv2d(pool+relu)"] and made[0][0]._ctx[0] == name
    assert_same(out)


def first_layer(cfg):
    """A conv -> pool -> ReLU group from `cfg` whose conv computes no input gradient."""
    def make():
        group = conv_pool(("pool", "relu"), cfg)()
        group[0].needs_input_grad = False
        return group
    return make


@pytest.mark.parametrize("algo, cfg", [c for c in FUSED if c[0] in ("direct", "single")])
def test_fused_first_layer_matches_numpy(algo, cfg):
    """A first layer (no input gradient) pooled in the kernel's pass: its weight gradient
    spreads the pooled gradient itself, odd last rows and columns included."""
    out = run_both(first_layer(cfg), randn(*cfg[-1]))
    assert out["numba"][1] is None
    assert_same(out)


@pytest.mark.parametrize("algo, cfg", [c for c in FUSED if c[0] == "single"])
def test_single_channel_first_layer_finite_differences(algo, cfg):
    """The one-channel kernels' own weight and bias gradients (the layer takes no input
    gradient, which check_module needs) against finite differences of <r, the group's output>."""
    with kernels.using("numba"):
        group = first_layer(cfg)().to(np.float64)
        x = randn(*cfg[-1], seed=4)
        y = group.forward(x)
        assert group[0]._ctx[2][4] is not None          # single.forward's own pass ran
        r = randn(*y.shape, seed=5)
        group.zero_grad()
        assert group.backward(r) is None

        def loss():
            return float(np.sum(r * group.forward(x)))

        for name, p in group.named_parameters():
            np.testing.assert_allclose(p.grad, numerical_grad(loss, p.data), rtol=1e-5,
                                       atol=1e-7, err_msg=name)


def test_single_weight_gradient_past_one_row_of_sums():
    """single.py's weight gradient sums LANES pooled outputs per pass: a pooled row of 5 x 64
    windows takes two passes, the second short."""
    from ddl.kernels import single
    cfg = (1, 2, 3, 1, 0, (64, 1, 12, 12))
    assert 5 * 64 > single.LANES
    out = run_both(first_layer(cfg), randn(*cfg[-1]))
    assert out["numba"][1] is None
    assert_same(out)


def test_ties_go_to_the_first_maximum_in_fused_passes():
    """Integer images with blank rows: exact ties in every method's arithmetic."""
    rng = np.random.default_rng(5)
    x = rng.integers(0, 3, size=(3, 32, 10, 10)).astype(np.float64)
    x[:, :, :4] = 0
    for cfg in [(32, 5, 3, 1, 0, None), (32, 5, 3, 1, 1, None), (4, 5, 3, 1, 1, None),
                (4, 2, 2, 1, 0, None), (1, 3, 3, 1, 0, None)]:  # Winograd x2, direct x2, single
        out = run_both(conv_pool(("relu", "pool"), cfg), x[:, :cfg[0]])
        assert_same(out)


@pytest.mark.parametrize("kernel, stride, shape", [
    (2, None, (2, 3, 6, 8)), (2, None, (1, 2, 7, 5)), (3, 2, (2, 2, 9, 7)),
    ((3, 2), (1, 2), (1, 2, 5, 6)), (2, 3, (1, 2, 8, 7))])
@pytest.mark.parametrize("relu", [False, True])
def test_max_pool_with_ties_matches_numpy(kernel, stride, shape, relu):
    x = np.random.default_rng(6).integers(-1, 2, size=shape).astype(np.float64)
    make = ((lambda: nn.Sequential(nn.MaxPool2d(kernel, stride), nn.ReLU())) if relu
            else (lambda: nn.MaxPool2d(kernel, stride)))
    if relu:
        with kernels.using("numba"):
            assert kinds(make().steps()) == ["MaxPool2d(relu)"]
    assert_same(run_both(make, x))


def test_non_finite_values_are_not_hidden():
    """NaN passes through ReLU and every pooling path: divergence must reach the loss."""
    x = randn(2, 32, 6, 6)
    x[0, 1, 2, 3] = np.nan
    with kernels.using("numba"):
        for make in (lambda: nn.ReLU(), lambda: nn.MaxPool2d(2),
                     lambda: nn.Sequential(nn.MaxPool2d(2), nn.ReLU()),
                     conv_pool(("pool", "relu"), (32, 2, 3, 1, 0, None)),
                     conv_pool(("pool", "relu"), (32, 2, 2, 1, 0, None)),
                     bn_block(True, True, False, channels=32)):
            assert np.isnan(make()(x)).any()
        logits = randn(3, 10)
        logits[1, 4] = np.nan
        assert np.isnan(nn.CrossEntropyLoss()(logits, np.array([0, 1, 2])))


@pytest.mark.parametrize("name", MODELS)
def test_named_models_fuse_and_match_numpy(name):
    x = randn(5, 1, 28, 28, seed=7)
    x[:, :, :6] = 0
    assert_same(run_both(lambda: build(name, *MNIST, seed=2, input_grad=False), x,
                         dtype=np.float32),
                tol=1e-5)


def test_fusion_keeps_the_module_tree_and_state_dict():
    model = build("ref-cnn", *MNIST, seed=0)
    before = model.state_dict()
    with kernels.using("numba"):
        steps = model.steps()
        model(np.zeros((2, 1, 28, 28), np.float32))
    assert kinds(steps) == ["Conv2d(pool+relu)", "Conv2d(pool+relu)", "Flatten", "Linear", "ReLU",
                            "Linear"]
    assert list(model.state_dict()) == list(before)
    assert len(model) == 10 and len(model.parameters()) == 8
    with kernels.using("numpy"):
        assert model.steps() == list(model)


def test_a_users_sequential_gets_the_fused_path():
    rng = np.random.default_rng(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, rng=rng), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(8, 8, 3, padding=1, rng=rng), nn.MaxPool2d(2), nn.ReLU(),
                        nn.Conv2d(8, 4, 3, stride=2, rng=rng), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten())
    with kernels.using("numba"):
        assert kinds(net.steps()) == ["Conv2d(pool+relu)", "Conv2d(pool+relu)", "Conv2d",
                                      "MaxPool2d(relu)", "Flatten"]


# --- batch normalisation, residual blocks, global average pooling ---------------------------------
def batchnorm(channels, rng):
    """A BatchNorm2d with random parameters and running statistics, none of them trivial."""
    bn = nn.BatchNorm2d(channels)
    bn.weight.data[...] = rng.uniform(0.5, 1.5, channels)
    bn.bias.data[...] = rng.uniform(-0.5, 0.5, channels)
    bn.running_mean[...] = rng.uniform(-0.2, 0.2, channels)
    bn.running_var[...] = rng.uniform(0.5, 2, channels)
    return bn


def bn_block(training, relu, shortcut, channels=3):
    """Residual(Conv2d -> BatchNorm2d) [-> ReLU], the shortcut the identity or a 1x1
    convolution and a BatchNorm2d: each variant of the fused tail (the residual add, and the
    ReLU, in the normalisation's pass), with batch or running statistics."""
    def make():
        rng = np.random.default_rng(3)
        bn = batchnorm(channels, rng)
        # Biases before batch statistics have a gradient of exactly 0: no biases, as in ResNets.
        skip = (nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False, rng=rng),
                              nn.BatchNorm2d(channels)) if shortcut else None)
        body = nn.Sequential(nn.Conv2d(channels, channels, 3, 1, 1, bias=False, rng=rng), bn)
        block = nn.Residual(body, skip)
        net = nn.Sequential(block, nn.ReLU()) if relu else block
        return net.train(training)
    return make


BN_CASES = [(t, r, s) for t in (True, False) for r in (True, False) for s in (True, False)]


@pytest.mark.parametrize("training, relu, shortcut", BN_CASES)
def test_batchnorm_residual_relu_fuse_and_match_numpy(training, relu, shortcut):
    make = bn_block(training, relu, shortcut)
    x = randn(3, 3, 5, 7)
    assert_same(run_both(make, x))
    with kernels.using("numba"):
        net = make()
        if relu:
            assert [k.endswith("(relu)") for k in kinds(net.steps())] == [True]
        check_module(net, randn(2, 3, 3, 5, seed=4))


@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_with_relu_and_its_statistics_match_numpy(training):
    def make():
        return nn.Sequential(nn.BatchNorm2d(5), nn.ReLU()).train(training)
    x = randn(4, 5, 3, 3) * 3 + 2
    assert_same(run_both(make, x))
    stats = {}
    for name in kernels.NAMES:
        with kernels.using(name):
            net = make()
            net(x.astype(np.float32))
            stats[name] = net[0].state_dict()
    for key, value in stats["numpy"].items():
        np.testing.assert_allclose(stats["numba"][key], value, rtol=1e-5, err_msg=key)
    with kernels.using("numba"):
        assert kinds(make().steps()) == ["BatchNorm2d(relu)"]
        check_module(make(), randn(3, 5, 2, 3, seed=5))


def test_global_average_pool_matches_numpy():
    x = randn(3, 5, 7, 6)
    assert_same(run_both(nn.GlobalAvgPool2d, x))
    with kernels.using("numba"):
        check_module(nn.GlobalAvgPool2d(), randn(2, 3, 5, 3))


def tail(kind, training, relu, channels=3):
    """`kind` ("bn", "residual", "residual+shortcut") [-> ReLU] -> GlobalAvgPool2d: what the
    compiled kernels run as one pass (a `Fused` step), with batch or running statistics."""
    def make():
        layer = (batchnorm(channels, np.random.default_rng(8)) if kind == "bn" else
                 bn_block(training, False, kind == "residual+shortcut", channels)())
        return nn.Sequential(layer, *[nn.ReLU()] * relu, nn.GlobalAvgPool2d()).train(training)
    return make


@pytest.mark.parametrize("kind", ["bn", "residual", "residual+shortcut"])
@pytest.mark.parametrize("training, relu", [(t, r) for t in (True, False) for r in (True, False)])
def test_global_average_pool_fuses_into_the_pass_before_it(kind, training, relu):
    make = tail(kind, training, relu)
    with kernels.using("numba"):
        steps = make().steps()
        assert [k.endswith("(relu+average)" if relu else "(average)") for k in kinds(steps)] == [
            True]
        assert repr(steps[0]).endswith("ReLU + global average pool" if relu else
                                       ") + global average pool")
    x = randn(4, 3, 5, 3) * 2 + 0.5
    assert_same(run_both(make, x))      # against NumPy's layers one by one
    with kernels.using("numba"):
        check_module(make(), randn(3, 3, 3, 2, seed=9))


@pytest.mark.parametrize("name", kernels.NAMES)
def test_batchnorm_with_average_is_batchnorm_then_the_pooling(name):
    """Each backend's batchnorm2d with `average` against its own batchnorm2d and pooling."""
    backend = kernels.get(name)
    x, w, b = randn(4, 3, 5, 3), randn(3, seed=1), randn(3, seed=2)
    gp = randn(4, 3, seed=3)
    for relu in (False, True):
        y, stats, ctx = backend.batchnorm2d_forward(x, w, b, 1e-5, None, relu)
        pooled, stats2, ctx2 = backend.batchnorm2d_forward(x, w, b, 1e-5, None, relu,
                                                           average=True)
        np.testing.assert_allclose(pooled, backend.global_avgpool2d_forward(y), atol=1e-12)
        np.testing.assert_allclose(stats2, stats, atol=1e-12)
        spread = backend.global_avgpool2d_backward(gp, y)
        for a, want in zip(backend.batchnorm2d_backward(gp, ctx2, w)[:3],
                           backend.batchnorm2d_backward(spread, ctx, w)[:3]):
            np.testing.assert_allclose(a, want, atol=1e-12)


def test_a_residual_that_adds_in_no_pass_of_its_own_is_not_averaged():
    """A body ending in a ReLU adds the shortcut apart: the pooling then stays a step."""
    block = nn.Residual(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.ReLU()))
    net = nn.Sequential(block, nn.GlobalAvgPool2d())
    with kernels.using("numba"):
        assert [type(s).__name__ for s in net.steps()] == ["Residual", "GlobalAvgPool2d"]
        with pytest.raises(ValueError, match="fuses only"):
            block.run(kernels.get(), randn(1, 2, 3, 3), average=True)
    assert_same(run_both(lambda: nn.Sequential(nn.Residual(nn.Sequential(
        nn.Conv2d(2, 2, 3, padding=1, rng=np.random.default_rng(1)), nn.ReLU())),
        nn.GlobalAvgPool2d()), randn(2, 2, 4, 4)))


def test_residual_mismatched_shapes_fail_in_one_line():
    block = nn.Residual(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3)))
    for name in kernels.NAMES:
        with kernels.using(name), pytest.raises(ValueError, match="the shortcut"):
            block(randn(1, 2, 4, 4))


def test_resnet_mini_is_planned_inside_its_blocks():
    model = build("resnet-mini", (3, 9, 9), 10)
    with kernels.using("numba"):
        assert kinds(model.steps()) == [
            "Conv2d", "BatchNorm2d(relu)", "ResidualBlock(relu)", "ResidualBlock(relu)",
            "ResidualBlock(relu+average)", "Linear"]
        assert model[3].body.steps()[-1] is model[3].body[-1]  # the add's pass: a BatchNorm
        assert compiled.slow_steps(model) == []


def test_layers_without_compiled_kernels_are_named():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten())
    assert compiled.slow_steps(net) == ["1", "2"]


# --- loss and optimizers --------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_cross_entropy_matches_numpy(scale):
    logits, labels = randn(7, 5) * scale, np.array([0, 4, 2, 2, 1, 3, 0])
    results = {}
    for name in kernels.NAMES:
        with kernels.using(name):
            loss = nn.CrossEntropyLoss()
            results[name] = (loss(logits, labels), loss.backward())
    assert np.isfinite(results["numba"][0])
    np.testing.assert_allclose(results["numba"][0], results["numpy"][0], rtol=1e-12)
    np.testing.assert_allclose(results["numba"][1], results["numpy"][1], atol=1e-12)


@pytest.mark.parametrize("make", [
    lambda ps: nn_optim().SGD(ps, 0.1),
    lambda ps: nn_optim().SGD(ps, 0.1, momentum=0.9, dampening=0.2, weight_decay=0.01),
    lambda ps: nn_optim().SGD(ps, 0.1, momentum=0.9, nesterov=True),
    lambda ps: nn_optim().Adam(ps, 0.01, weight_decay=0.1),
    lambda ps: nn_optim().RMSprop(ps, 0.01),
    lambda ps: nn_optim().RMSprop(ps, 0.01, momentum=0.5, centered=True, weight_decay=0.1),
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_optimizer_updates_match_numpy(make, dtype):
    results = {}
    for name in kernels.NAMES:
        with kernels.using(name):
            params = [nn.Parameter(randn(4, 3, seed=8), dtype), nn.Parameter(randn(5, seed=9),
                                                                              dtype)]
            opt = make(params)
            for step in range(4):
                for i, p in enumerate(params):
                    p.grad[...] = randn(*p.shape, seed=10 + 2 * step + i)
                opt.step()
            results[name] = [p.data.copy() for p in params], opt.state_dict()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-14)
    for a, b in zip(results["numba"][0], results["numpy"][0]):
        assert a.dtype == dtype
        np.testing.assert_allclose(a, b, **tol)
    state, reference = results["numba"][1]["state"], results["numpy"][1]["state"]
    assert state.keys() == reference.keys()
    for i in state:
        for k in reference[i]:
            np.testing.assert_allclose(state[i][k], reference[i][k], **tol)


def nn_optim():
    from ddl import optim
    return optim


# --- compilation ----------------------------------------------------------------------------------
def test_warm_declares_every_signature_training_uses():
    """After warm(), training steps of every named model (and evaluation) compile nothing new:
    the float32 signatures the kernels declare are the ones really called."""
    from ddl.optim import OPTIMIZERS, make_optimizer
    from ddl.parallel import flatten
    with kernels.using("numba"):
        kernels.warm()
        before = jit.signature_count()
        for name, opt, flat in zip(MODELS, [*OPTIMIZERS] * 2, [False, True] * len(MODELS)):
            model = build(name, *MNIST, seed=0, input_grad=False)
            if flat:        # as in training
                flatten(model.parameters())
            optimizer = make_optimizer(opt, model.parameters(), 0.1, momentum=0.9)
            loss = nn.CrossEntropyLoss()
            x = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
            loss(model(x), np.array([1, 2, 3]))
            model.backward(loss.backward())
            model.step(optimizer)
            model.eval()(x)
    assert jit.signature_count() == before


def test_the_backends_offer_the_same_operations():
    """Every backend offers each operation, with at least the reference's arguments."""
    import inspect
    reference = kernels.get("numpy")
    for name in kernels.NAMES:
        backend = kernels.get(name)
        assert backend.name == name
        for op in kernels.OPERATIONS:
            fn = getattr(backend, op)
            want = list(inspect.signature(getattr(reference, op)).parameters)
            got = list(inspect.signature(getattr(fn, "py_func", fn)).parameters)
            assert len(got) >= len(want), (name, op)
    with kernels.using("numpy"):
        assert kernels.get() is reference
    with kernels.using("numba"):
        assert kernels.get() is kernels.get("numba") is not reference


def test_importing_the_kernels_changes_nothing_until_setup(tmp_path):
    """Importing every kernel module leaves numba's cache alone; `setup()` gives them their
    cache. (Importing the backend that runs them, ddl.kernels.numba, sets numba up: test_jit.)"""
    cache = tmp_path / "cache"
    probe = ("import os, sys; import numba; from ddl.kernels import jit, bf16, direct, gemm, "
             "loss, norm, optim, pool, single, strided, winograd; "
             "before = (os.path.exists(sys.argv[1]), numba.config.CACHE_DIR); "
             "from ddl import kernels; kernels.setup(); kernels.setup(); "
             "print(before, os.listdir(sys.argv[1]), jit.cache_dir())")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache))
    out = subprocess.run([sys.executable, "-c", probe, cache], env=env, capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    before, listed, folder = out.stdout.rsplit(" ", 1)[0], out.stdout, out.stdout.split()[-1]
    assert before.startswith(f"(False, '{cache}')"), out.stdout
    assert os.path.dirname(folder) == str(cache) and os.path.basename(folder) in listed


def test_rank_0_compiles_first_and_the_others_load(tmp_path):
    """Two ranks starting together on an empty cache: rank 1 starts loading only once rank 0 has
    compiled (some kernels: see job_warm), and loads them far faster than compiling. (On 2 cores,
    both compiling at once would take about twice as long.)"""
    from conftest import run_mpi
    folder = tmp_path / "cache"
    done = run_mpi(2, [os.path.join(ROOT, "tests", "mpi_jobs.py"), "warm", tmp_path],
                   NUMBA_CACHE_DIR=str(folder))
    assert done.returncode == 0, done.stderr
    first, second = (json.loads((tmp_path / f"warm{r}.json").read_text()) for r in (0, 1))
    assert second["end"] - second["seconds"] >= first["end"] - 0.05     # one clock, one machine
    assert first["seconds"] > 3 * second["seconds"], (first, second)
    assert any(name.endswith(".nbi") for _, _, names in os.walk(folder) for name in names)
    # A process that calls a kernel without warm (an MPI test job, a script of the user's) loads
    # what warm stored: numba keys its cache by the signature as `compile` is given it.
    probe = ("import numpy as np; from ddl import kernels; kernels.get(); "
             "from ddl.kernels import pool; x = np.ones(5, np.float32); pool.relu(x, x); "
             "s = pool.relu.stats; print(sum(s.cache_hits.values()), sum(s.cache_misses.values()))")
    lazy = run([sys.executable, "-c", probe], NUMBA_CACHE_DIR=str(folder))
    assert lazy.stdout.split() == ["1", "0"], lazy.stdout + lazy.stderr


class Ranks:
    """Rank `rank` of `size`, recording its barriers and broadcasts in `events`."""
    def __init__(self, rank, size, events):
        self.rank, self.size, self.events = rank, size, events

    def barrier(self, what, at_least=0.0):
        self.events.append(("barrier", what.split("after ")[-1], at_least))

    def bcast_obj(self, obj, root=0, what=""):
        self.events.append(("bcast", what, obj))
        return "haswell"


@pytest.mark.parametrize("rank, size", [(0, 2), (1, 2), (0, 1), (None, None)])
def test_warm_order_rank_0_compiles_before_the_others_load(rank, size, monkeypatch):
    """Rank 0 tunes and compiles first, the others wait for it, then load what it cached; one
    process compiles without tuning together (a communicator of one: its barrier is free); with
    NumPy's kernels there is nothing to compile. Only a process without ranks compiles in
    several (`make install`): MPI's ranks are not forked."""
    events = []
    monkeypatch.setattr(jit, "warm", lambda processes: events.append(f"warm {processes}") or 1.5)
    monkeypatch.setenv("NUMBA_CPU_NAME", jit.target())    # restored after the ranks' setdefault
    comm = None if rank is None else Ranks(rank, size, events)
    with kernels.using("numpy"):
        assert kernels.warm(comm) == 0.0 and events == []
    with kernels.using("numba"):
        assert kernels.warm(comm) == 1.5
    # Whatever --timeout says, a rank waits up to 600 s for rank 0's compile (docs/faults.md).
    compiled = ("barrier", "rank 0's kernel compile", 600.0)
    tuned = [("barrier", "rank 0's kernel tuning", 600.0),
             ("bcast", "rank 0's kernel CPU name", jit.target() if rank == 0 else None)]
    expected = {(0, 2): tuned + ["warm 1", compiled], (1, 2): tuned + [compiled, "warm 1"],
                (0, 1): ["warm 1", compiled], (None, None): ["warm 1"]}
    assert events == expected[rank, size]
    events.clear()
    with kernels.using("numba"):
        kernels.warm(comm, processes=2)
    assert ("warm 2" if comm is None else "warm 1") in events


def test_kernels_choice_is_checked():
    with pytest.raises(ValueError, match="numba, numpy"):
        kernels.use("cuda")
    with pytest.raises(ValueError, match="unknown kernels 'cuda'"):
        kernels.get("cuda")


@pytest.fixture
def read_only(tmp_path):
    """(folder, seal): fill the folder, then seal() makes it read-only for real, for root too
    (a tmpfs mount remounted read-only; skipped where mounting is not allowed)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        yield folder, lambda: [os.chmod(d, 0o555) for d, _, _ in os.walk(folder)]
        for d, _, _ in os.walk(folder):
            os.chmod(d, 0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(folder)]).returncode:
        needs("mount", "cannot mount a tmpfs to make a folder read-only for root")
    try:
        yield folder, lambda: subprocess.run(["mount", "-o", "remount,ro", str(folder)],
                                             check=True)
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_read_only_install_caches_elsewhere(read_only, tmp_path):
    """ddl installed read-only compiles into $XDG_CACHE_HOME/ddl, or into the temporary folder
    when that is read-only too."""
    folder, seal = read_only
    shutil.copytree(os.path.join(ROOT, "ddl"), folder / "ddl",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "cache").mkdir()
    seal()
    probe = (f"import numpy as np; from ddl import kernels; kernels.setup(); "
             f"from ddl.kernels import jit, pool; "
             f"assert pool.__file__.startswith({str(folder)!r}), pool.__file__; "
             f"x = np.ones(4, np.float32); pool.relu(x, x); print(jit.cache_dir())")
    for user_cache, expected in ((tmp_path / "cache", tmp_path / "cache" / "ddl"),
                                 (folder / "cache", tmp_path / "tmp" / f"ddl-{os.getuid()}")):
        (tmp_path / "tmp").mkdir(exist_ok=True)
        env = dict(os.environ, PYTHONPATH=str(folder), XDG_CACHE_HOME=str(user_cache),
                   TMPDIR=str(tmp_path / "tmp"))
        env.pop("NUMBA_CACHE_DIR", None)
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                             text=True, timeout=120, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        cache = out.stdout.strip()
        assert os.path.dirname(cache) == str(expected)
        assert any(name.endswith(".nbi") for _, _, names in os.walk(cache) for name in names)

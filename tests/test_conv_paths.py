"""Every code path of the direct and Winograd convolution kernels (ddl/kernels/direct.py,
winograd.py) on small shapes, against the NumPy backend: output, input gradient and parameter
gradients, plain and fused with the 2x2 max pool and ReLU, with and without the input gradient,
two steps in a row (the Workspace's buffers are reused). Each case forces its algorithm
($DDL_CONV_ALGORITHM: Winograd for few channels, whose thresholds are speed, not correctness; the
direct kernel for one input channel), so that these run in seconds even with the kernels as
Python: they are the mutation tests' selection for those two files (scripts/mutate.py)."""
import numpy as np
import pytest

from ddl import kernels, nn
from ddl.kernels import convplan, direct
from ddl.kernels import numba as compiled
from ddl.models import MODELS, build
from conftest import MNIST

# (algorithm, in, out, kernel, padding, input (N, C, H, W)): the direct kernel's output
# channels 1 to 5 (every remainder mod its block of 4), widths of 1 to 7 taps (every remainder
# of its blocks of 3 taps), rows of more than CHUNK values, the input gradient by the flipped
# forward and by the GEMM (an output under half the input's size); Winograd's odd output rows
# and columns (cropped tiles), more tile columns than rows, one tile, paddings 0 to 2.
CASES = [
    ("direct", 1, 1, 3, 1, (2, 1, 5, 6)),
    ("direct", 2, 2, (2, 4), (1, 2), (3, 2, 5, 7)),
    ("direct", 2, 3, (1, 5), (0, 2), (1, 2, 5, 6)),
    ("direct", 3, 4, (3, 7), (1, 3), (2, 3, 4, 9)),
    ("direct", 2, 5, (3, 1), 0, (2, 2, 7, 5)),
    ("direct", 1, 2, 3, 0, (int(direct.CHUNK) // 12 + 4, 1, 4, 14)),   # rows of 12 x N: 2 chunks
    ("direct", 2, 4, 5, 0, (2, 2, 9, 8)),         # 5x4 outputs of 9x8 inputs: the GEMM
    ("direct", 2, 1, (4, 2), (1, 0), (2, 2, 8, 9)),   # 7x8 of 8x9: the flipped forward
    ("winograd", 2, 3, 3, 0, (2, 2, 7, 10)),
    ("winograd", 3, 2, 3, 1, (1, 3, 5, 7)),
    ("winograd", 1, 2, 3, 2, (3, 1, 3, 4)),
    ("winograd", 2, 1, 3, 0, (2, 2, 4, 4)),       # one tile
    ("winograd", 1, 2, 3, 0, (2, 1, 5, 4)),       # 3x2 outputs: padded below, not right
    ("winograd", 2, 1, 3, 0, (1, 2, 4, 5)),       # 2x3 outputs: padded right, not below
]
ORDERS = [(), ("pool",), ("pool", "relu"), ("relu", "pool")]


def model(case, order, input_grad):
    _, cin, cout, k, p, _ = case
    conv = nn.Conv2d(cin, cout, k, padding=p, rng=np.random.default_rng(1))
    conv.needs_input_grad = input_grad
    layers = {"pool": nn.MaxPool2d(2), "relu": nn.ReLU()}
    return nn.Sequential(conv, *(layers[name] for name in order)).to(np.float64)


def two_steps(case, order, input_grad):
    """[(y, grad_x, grad_w, grad_b)] of two forward and backward passes through one model."""
    net, rng, out = model(case, order, input_grad), np.random.default_rng(2), []
    for _ in range(2):
        x = rng.standard_normal(case[-1])
        x[..., :2, :] = np.round(x[..., :2, :])     # flat rows: ties, and ReLU cutting windows
        y = net.forward(x)
        net.zero_grad()
        gx = net.backward(rng.standard_normal(y.shape))
        out.append((y, gx, net[0].weight.grad.copy(), net[0].bias.grad.copy()))
    return out


@pytest.mark.parametrize("input_grad", [True, False])
@pytest.mark.parametrize("order", ORDERS, ids="-".join)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-{c[-1]}")
def test_conv_kernels_on_small_shapes_match_numpy(case, order, input_grad, monkeypatch):
    monkeypatch.setenv(convplan.FORCE, case[0])
    got = {}
    for name in kernels.NAMES:
        with kernels.using(name):
            got[name] = two_steps(case, order, input_grad)
    with kernels.using("numba"):
        net = model(case, order, input_grad)
        net.forward(np.zeros(case[-1]))
        assert net[0]._ctx[0] == case[0]          # the algorithm forced ran
    for step, (mine, want) in enumerate(zip(got["numba"], got["numpy"])):
        for what, a, b in zip(("output", "input gradient", "weight gradient", "bias gradient"),
                              mine, want):
            if b is None:
                assert a is None, what
                continue
            assert a.shape == b.shape, what
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10,
                                       err_msg=f"{what}, step {step + 1}")


def test_direct_fits_only_a_padding_below_the_kernel():
    assert direct.fits((1, 1, 3, 5), (2, 4))
    assert not direct.fits((1, 1, 3, 5), (3, 0))
    assert not direct.fits((1, 1, 3, 5), (0, 5))


def test_the_direct_kernels_compiled_ahead_are_the_named_models():
    """`warm` compiles the direct kernels for the sizes in direct.COMMON: every direct layer of
    a named model (on MNIST) must find its size there, or its first step compiles."""
    sizes = set()
    for name in MODELS:
        for layer in build(name, *MNIST).modules():
            if isinstance(layer, nn.Conv2d) and compiled.algorithm(
                    layer.weight.shape, layer.stride, layer.padding) == "direct":
                sizes.add(layer.kernel_size)
    assert sizes == set(direct.COMMON)


def test_direct_pads_output_channels_to_the_next_multiple_of_its_block():
    """The kernels hold OB output channels by name; more zero channels than that rounding would
    only cost time."""
    assert [direct.blocks(count) for count in range(1, 10)] == [4, 4, 4, 4, 8, 8, 8, 8, 12]

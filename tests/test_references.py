"""Every layer's forward values, and the convolutions' three results, against references written
here, in float64, with neither backend's code: the gradient checks compare a backward with its own
forward, so a forward that computes the wrong function (a mean over k + 1, a sum for a mean)
passes them. The convolution cases reach every block of the direct kernel's taps (widths past 5
and 10), both strides and paddings, odd channel counts, and batches of one and of many."""
import math

import numpy as np
import pytest

from ddl import nn

pytestmark = pytest.mark.usefixtures("backend")  # NumPy and compiled kernels alike


def randn(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def padded(x, ph, pw):
    out = np.zeros((*x.shape[:2], x.shape[2] + 2 * ph, x.shape[3] + 2 * pw))
    out[:, :, ph:ph + x.shape[2], pw:pw + x.shape[3]] = x
    return out


def windows(x, kh, kw, sh, sw):
    """{(r, q): x[:, :, window (r, q)]} for each output position of an unpadded sliding window."""
    oh, ow = (x.shape[2] - kh) // sh + 1, (x.shape[3] - kw) // sw + 1
    return {(r, q): x[:, :, r * sh:r * sh + kh, q * sw:q * sw + kw]
            for r in range(oh) for q in range(ow)}, (oh, ow)


def reference_conv(x, w, b, stride, padding, grad_y):
    """y, grad_x, grad_w, grad_b of a cross-correlation, one output position at a time."""
    (sh, sw), (ph, pw), (_, _, kh, kw) = stride, padding, w.shape
    xp = padded(x, ph, pw)
    views, (oh, ow) = windows(xp, kh, kw, sh, sw)
    y = np.empty((x.shape[0], w.shape[0], oh, ow))
    gxp, gw = np.zeros_like(xp), np.zeros_like(w)
    for (r, q), v in views.items():
        y[:, :, r, q] = np.einsum("ncij,ocij->no", v, w) + b
        g = grad_y[:, :, r, q]
        gw += np.einsum("no,ncij->ocij", g, v)
        gxp[:, :, r * sh:r * sh + kh, q * sw:q * sw + kw] += np.einsum("no,ocij->ncij", g, w)
    gx = gxp[:, :, ph:ph + x.shape[2], pw:pw + x.shape[3]]
    return y, gx, gw, grad_y.sum(axis=(0, 2, 3))


# (in, out, kernel, stride, padding, batch, H, W)
CONVS = [
    (1, 2, 7, 1, 3, 2, 9, 11),          # one channel: the direct kernel, two blocks of taps
    (3, 2, (3, 11), 1, (1, 5), 3, 6, 13),   # three blocks of taps across the width
    (2, 3, (7, 1), 1, (3, 0), 1, 8, 5),     # tall and thin, a batch of one
    (5, 3, 9, 1, 0, 2, 10, 12),         # several channels, no padding
    (4, 3, 3, 1, 1, 17, 5, 7),          # Winograd, odd outputs, a batch above any small tile
    (7, 5, 3, 1, 0, 1, 4, 4),           # Winograd, odd channels, a batch of one
    (3, 4, 3, 2, 1, 3, 7, 8),           # strided
    (3, 2, (5, 3), (2, 3), (2, 1), 2, 9, 10),  # strided, rectangular, uneven
    (5, 4, 1, 1, 0, 3, 4, 5),           # 1x1
    (5, 4, 1, 2, 0, 2, 5, 6),           # strided 1x1
]


@pytest.mark.parametrize("cfg", CONVS)
def test_conv2d_against_its_definition(cfg):
    cin, cout, k, s, p, n, h, w = cfg
    conv = nn.Conv2d(cin, cout, k, s, p, rng=1).to(np.float64)
    x = randn(n, cin, h, w, seed=2)
    y = conv.forward(x)
    grad_y = randn(*y.shape, seed=3)
    gx = conv.backward(grad_y)
    ry, rgx, rgw, rgb = reference_conv(x, conv.weight.data, conv.bias.data, conv.stride,
                                       conv.padding, grad_y)
    for what, got, want in (("output", y, ry), ("input gradient", gx, rgx),
                            ("weight gradient", conv.weight.grad, rgw),
                            ("bias gradient", conv.bias.grad, rgb)):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9, err_msg=what)


@pytest.mark.parametrize("relu_first", [False, True])
def test_conv_pool_relu_against_its_definition(relu_first):
    """A Sequential that the compiled backend fuses into one pass, 7 taps wide."""
    conv = nn.Conv2d(2, 3, (3, 7), 1, (1, 3), rng=1)
    layers = [conv, nn.ReLU(), nn.MaxPool2d(2)] if relu_first else [conv, nn.MaxPool2d(2),
                                                                     nn.ReLU()]
    model = nn.Sequential(*layers).to(np.float64)
    x = randn(3, 2, 6, 10, seed=4)
    y = model.forward(x)
    conv_y = reference_conv(x, conv.weight.data, conv.bias.data, (1, 1), (1, 3),
                            np.zeros((3, 3, 6, 10)))[0]
    want = np.maximum(conv_y.reshape(3, 3, 3, 2, 5, 2).max(axis=(3, 5)), 0)
    np.testing.assert_allclose(y, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("cout, k, padding, shape", [(3, 5, 0, (2, 1, 12, 11)),
                                                      (4, (3, 2), (1, 0), (5, 1, 7, 9))])
def test_pooled_first_layer_against_its_definition(cout, k, padding, shape):
    """One input channel, max pool 2x2 and ReLU, no input gradient: the demo networks' first
    layer (the compiled backend's `single` kernels), odd sides included."""
    conv = nn.Conv2d(1, cout, k, 1, padding, rng=1)
    conv.needs_input_grad = False
    model = nn.Sequential(conv, nn.MaxPool2d(2), nn.ReLU()).to(np.float64)
    x = randn(*shape, seed=4)
    y = model.forward(x)
    grad_y = randn(*y.shape, seed=5)
    assert model.backward(grad_y) is None
    w, b = conv.weight.data, conv.bias.data
    (n, o, ph, pw), (kh, kw), (p, q) = y.shape, w.shape[2:], conv.padding
    out = (n, o, shape[2] + 2 * p - kh + 1, shape[3] + 2 * q - kw + 1)
    conv_y = reference_conv(x, w, b, (1, 1), conv.padding, np.zeros(out))[0]
    windows4 = conv_y[:, :, :2 * ph, :2 * pw].reshape(n, o, ph, 2, pw, 2)
    windows4 = windows4.transpose(0, 1, 2, 4, 3, 5).reshape(n, o, ph, pw, 4)
    first = windows4.argmax(axis=-1)            # the first maximum takes the gradient
    best = windows4.max(axis=-1)
    np.testing.assert_allclose(y, np.maximum(best, 0), rtol=1e-12, atol=1e-12)
    spread = np.zeros(windows4.shape)
    np.put_along_axis(spread, first[..., None], (grad_y * (best > 0))[..., None], axis=-1)
    grad_conv_y = np.zeros(conv_y.shape)
    grad_conv_y[:, :, :2 * ph, :2 * pw] = spread.reshape(n, o, ph, pw, 2, 2).transpose(
        0, 1, 2, 4, 3, 5).reshape(n, o, 2 * ph, 2 * pw)
    _, _, want_w, want_b = reference_conv(x, w, b, (1, 1), conv.padding, grad_conv_y)
    np.testing.assert_allclose(conv.weight.grad, want_w, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(conv.bias.grad, want_b, rtol=1e-9, atol=1e-9)


def test_linear_against_its_definition():
    layer = nn.Linear(7, 3, rng=0).to(np.float64)
    x = randn(4, 7)
    want = [[sum(layer.weight.data[o, i] * x[n, i] for i in range(7)) + layer.bias.data[o]
             for o in range(3)] for n in range(4)]
    np.testing.assert_allclose(layer.forward(x), want, rtol=1e-12)


@pytest.mark.parametrize("kernel, stride, shape", [(2, 2, (2, 3, 6, 8)), (3, 2, (1, 2, 7, 9)),
                                                   ((2, 3), (1, 2), (3, 1, 5, 7))])
@pytest.mark.parametrize("kind", ["max", "avg"])
def test_pools_against_their_definition(kind, kernel, stride, shape):
    layer = (nn.MaxPool2d if kind == "max" else nn.AvgPool2d)(kernel, stride).to(np.float64)
    x = randn(*shape)
    views, _ = windows(x, *layer.kernel_size, *layer.stride)
    reduce = np.max if kind == "max" else np.mean
    y = layer.forward(x)
    for (r, q), v in views.items():
        np.testing.assert_allclose(y[:, :, r, q], reduce(v, axis=(2, 3)), rtol=1e-12)
    assert y.shape[2:] == (max(r for r, _ in views) + 1, max(q for _, q in views) + 1)


def test_global_average_pool_against_its_definition():
    x = randn(3, 4, 5, 6)
    want = [[sum(x[n, c].ravel()) / 30 for c in range(4)] for n in range(3)]
    np.testing.assert_allclose(nn.GlobalAvgPool2d().forward(x), want, rtol=1e-12)


@pytest.mark.parametrize("layer, scalar", [
    (nn.ReLU(), lambda v: max(v, 0.0)),
    (nn.LeakyReLU(0.1), lambda v: v if v > 0 else 0.1 * v),
    (nn.Tanh(), math.tanh),
    (nn.Sigmoid(), lambda v: 1 / (1 + math.exp(-v))),
])
def test_activations_against_their_definition(layer, scalar):
    x = randn(2, 3, 4, 5) * 3
    want = np.vectorize(scalar)(x)
    np.testing.assert_allclose(layer.forward(x), want, rtol=1e-12, atol=1e-15)


def test_flatten_and_dropout_against_their_definition():
    x = randn(2, 3, 4, 5)
    np.testing.assert_array_equal(nn.Flatten().forward(x),
                                  [x[n].ravel() for n in range(2)])
    drop = nn.Dropout(0.25, rng=0)
    y = drop.forward(x)
    kept = y != 0
    assert 0.6 < kept.mean() < 0.9
    np.testing.assert_allclose(y[kept], x[kept] / 0.75, rtol=1e-6)
    np.testing.assert_array_equal(drop.eval().forward(x), x)


@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_against_its_definition(training):
    bn = nn.BatchNorm2d(3, eps=1e-3, momentum=0.2).to(np.float64)
    bn.weight.data[...] = [0.5, 2.0, -1.0]
    bn.bias.data[...] = [0.1, -0.2, 0.3]
    bn.running_mean[...] = [0.2, -0.1, 0.4]
    bn.running_var[...] = [1.5, 0.5, 2.0]
    x = randn(4, 3, 2, 3) * 2 + 1
    bn.train(training)
    y = bn.forward(x)
    for c in range(3):
        values = x[:, c].ravel()
        n = len(values)
        mean = sum(values) / n if training else [0.2, -0.1, 0.4][c]
        var = sum((v - mean) ** 2 for v in values) / n if training else [1.5, 0.5, 2.0][c]
        want = (x[:, c] - mean) / math.sqrt(var + 1e-3) * bn.weight.data[c] + bn.bias.data[c]
        np.testing.assert_allclose(y[:, c], want, rtol=1e-10, atol=1e-12)
        if training:
            assert bn.running_mean[c] == pytest.approx(0.8 * [0.2, -0.1, 0.4][c] + 0.2 * mean)
            unbiased = sum((v - mean) ** 2 for v in values) / (n - 1)
            assert bn.running_var[c] == pytest.approx(0.8 * [1.5, 0.5, 2.0][c] + 0.2 * unbiased)


def test_residual_against_its_definition():
    body = nn.Sequential(nn.Conv2d(3, 3, 3, 1, 1, rng=0), nn.Tanh())
    shortcut = nn.Conv2d(3, 3, 1, rng=1)
    x = randn(2, 3, 5, 5)
    for skip in (None, shortcut):
        block = nn.Residual(body, skip).to(np.float64)
        want = body.forward(x) + (x if skip is None else skip.forward(x))
        np.testing.assert_allclose(block.forward(x), want, rtol=1e-12)

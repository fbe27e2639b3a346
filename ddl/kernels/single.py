"""Convolution of a single input channel followed by a 2x2 max pool (and ReLU): a network's first
layer on grey images, seed-cnn's and ref-cnn's.

With one input channel the direct kernel (direct.py) does little work per value it loads: each
input value feeds the four output channels of its block, whose weights (4 x kh x kw, 100 for 5x5)
do not fit in the registers, so nearly every multiply-add also loaded a weight; it also padded
10 channels to 12, and pooled in a second pass over rows it had stored. Here one iteration of
the vectorised loop computes one pooling window, 2x2 outputs of one channel, for 16 (or 8)
images of the batch, the innermost axis of (C, H, W, N) memory: each input value loaded feeds up
to four of those outputs, each weight loaded all four, and the window is pooled (and ReLU'd) in
the registers. The loop runs along a whole pooled row: the input is first split into its even
and odd columns (`split`), so that the columns a window reads, 2pc + u, lie at pc + u // 2 of
one half, a fixed distance from the window's own index. seed-cnn's and ref-cnn's first layers
ran forward in half the direct kernel's time (A/B in one run: 1.8-2.2x, compiled for znver4 and
for haswell, on a loaded 2-core Xeon model 167).

The weight gradient of a layer of up to MAX_TAPS taps spreads each window's gradient to its
first maximum (pool.spread4) in the registers too, and adds g * x over the window's four
positions into a row of sums per tap, LANES windows long, kept in the L1 cache and summed once
per channel. Unpooled layers, input gradients and larger kernels' weight gradients go to the
direct kernels."""
import functools

import numpy as np

from ddl.kernels import arrays, direct
from ddl.kernels.jit import X3, kernel
from ddl.kernels.pool import first_max4, spread4

LANES = 256     # pooled outputs per row of the weight gradient's sums (a constant: see there)
# The weight gradient here loads and stores a row of sums per tap and window: past 3x3 the direct
# kernel's (four channels by three taps in registers) was faster. Same-run medians, batch 64, on
# a loaded 2-core Xeon (model 167), this kernel's time over the direct one's, compiled for znver4
# and haswell, three runs each: seed-cnn's 5x5 first layer 0.97-1.37 (median 1.23), ref-cnn's
# 3x3 one 0.60-0.95 (median 0.78).
MAX_TAPS = 9


@functools.lru_cache(maxsize=None)
def forward_kernel(kh, kw):
    """The forward kernel compiled for kh x kw kernels (closing over two ints only: see
    direct.forward_kernel)."""

    @kernel(f"({X3}, {X3}, T[::1], int64, boolean, {X3}, uint8[:, :, ::1])")
    def conv(xs, w, bias, n, relu, y, code):
        """y and code (O, PH, PW*N) = the convolution of x (H, W*N) with w (O, kh, kw) plus
        bias, max-pooled 2x2 (ReLU'd if relu), and each window's code (pool.py); xs (2, H,
        ceil(W/2)*N) holds x's even and odd columns (`split`)."""
        nu = np.uint64(n)
        for pr in range(y.shape[1]):
            for o in range(w.shape[0]):
                ys, codes = y[o, pr], code[o, pr]
                for m in range(np.uint64(y.shape[2])):
                    # s[a][b]: the output at row 2pr + a, column 2pc + b of the window that m
                    # is lane k of (m = pc*N + k).
                    s00 = s01 = s10 = s11 = bias[o]
                    # Input row 2pr + t, column 2pc + u feeds output (a, b) through tap
                    # (t - a, u - b); column 2pc + u is xs[u % 2] at pc + u // 2.
                    for t in range(kh + 1):
                        for u in range(kw + 1):
                            v = xs[u % 2, 2 * pr + t][np.uint64(u // 2) * nu + m]
                            if t < kh and u < kw:
                                s00 += w[o, t, u] * v
                            if t < kh and u >= 1:
                                s01 += w[o, t, u - 1] * v
                            if t >= 1 and u < kw:
                                s10 += w[o, t - 1, u] * v
                            if t >= 1 and u >= 1:
                                s11 += w[o, t - 1, u - 1] * v
                    ys[m], codes[m] = first_max4(s00, s01, s10, s11, relu)

    return conv


@functools.lru_cache(maxsize=None)
def weight_grad_kernel(kh, kw):
    """The weight-gradient kernel compiled for kh x kw kernels."""

    @kernel(f"({X3}, {X3}, uint8[:, :, ::1], int64, T[::1], {X3}, T[::1])")
    def conv_weight_grad(xs, gy, code, n, sums, grad_w, grad_b):
        """grad_w (O, kh, kw) += the weight gradient and grad_b (O,) += the bias gradient of
        forward_kernel's pooled convolution, from the pooled output's gradient gy and codes
        (O, PH, PW*N); xs as there. sums ((kh*kw + 1) * LANES,) is scratch: per tap, and for
        the bias, one row of sums for LANES pooled outputs. The rows lie a constant LANES
        apart, which lets LLVM see that they never overlap (rows of an (kh*kw, N) array, N an
        argument, kept the loop scalar)."""
        nu, lanes, width = np.uint64(n), np.uint64(LANES), np.uint64(gy.shape[2])
        bias_row = np.uint64(kh * kw) * lanes
        for o in range(gy.shape[0]):
            sums[:] = 0
            for m0 in range(np.uint64(0), width, lanes):
                for pr in range(gy.shape[1]):
                    gys, codes = gy[o, pr], code[o, pr]
                    for m in range(m0, min(m0 + lanes, width)):
                        # the window's gradient, all of it at its first maximum (or nowhere)
                        g00, g01, g10, g11 = spread4(gys[m], codes[m])
                        sums[bias_row + m - m0] += g00 + g01 + g10 + g11
                        for i in range(kh):
                            top, bottom = 2 * pr + i, 2 * pr + i + 1
                            for j in range(kw):
                                left = np.uint64(j // 2) * nu + m
                                right = np.uint64((j + 1) // 2) * nu + m
                                sums[np.uint64(i * kw + j) * lanes + m - m0] += (
                                    g00 * xs[j % 2, top][left]
                                    + g01 * xs[(j + 1) % 2, top][right]
                                    + g10 * xs[j % 2, bottom][left]
                                    + g11 * xs[(j + 1) % 2, bottom][right])
            for i in range(kh):
                for j in range(kw):
                    grad_w[o, i, j] += sums[(i * kw + j) * LANES:(i * kw + j + 1) * LANES].sum()
            grad_b[o] += sums[kh * kw * LANES:].sum()

    return conv_weight_grad


for _shape in direct.COMMON:           # registers them with `warm`
    forward_kernel(*_shape)
    if _shape[0] * _shape[1] <= MAX_TAPS:
        weight_grad_kernel(*_shape)


def fits(weight_shape, padding):
    """Whether this layer is this module's: one input channel, and a padding that the direct
    kernels take (they run what these do not)."""
    return weight_shape[1] == 1 and direct.fits(weight_shape, padding)


def split(x, ws):
    """x (1, H, W, N) as (2, H, ceil(W/2)*N): its even columns, then its odd ones (a last odd
    column past W is left as it was: never read)."""
    _, h, w, n = x.shape
    xs = ws.empty("x_split", (2, h, (w + 1) // 2, n), x.dtype)
    xs[0] = x[0, :, 0::2]
    xs[1, :, :w // 2] = x[0, :, 1::2]
    return xs.reshape(2, h, -1)


def forward(x, weight, bias, padding, pool, relu, ws):
    """As direct.forward, with the split input after its ctx (None where the direct kernel ran:
    an unpooled layer)."""
    if not pool:
        y, ctx = direct.forward(x, weight, bias, padding, pool, relu, ws)
        return y, ctx + (None,)
    (o, _, kh, kw), n = weight.shape, x.shape[3]
    xp = arrays.pad(x, padding, ws)
    y = arrays.empty((o, (xp.shape[1] - kh + 1) // 2, (xp.shape[2] - kw + 1) // 2, n), x.dtype)
    code = arrays.empty(y.shape, np.uint8)
    xs = split(xp, ws)
    forward_kernel(kh, kw)(xs, weight.reshape(o, kh, kw), bias, n, relu,
                           y.reshape(o, y.shape[1], -1), code.reshape(o, y.shape[1], -1))
    return y, (x, code, padding, x.shape, xs)


def backward(gy, ctx, weight, grad_w, grad_b, input_grad, ws):
    """As direct.backward (which computes the input gradient, and an unpooled layer's or one
    of more than MAX_TAPS taps)."""
    xs, code = ctx[4], ctx[1]
    if input_grad or xs is None or weight.shape[2] * weight.shape[3] > MAX_TAPS:
        return direct.backward(gy, ctx[:4], weight, grad_w, grad_b, input_grad, ws)
    (o, _, kh, kw), n = weight.shape, gy.shape[3]
    sums = ws.empty("tap_sums", ((kh * kw + 1) * LANES,), gy.dtype)
    weight_grad_kernel(kh, kw)(xs, gy.reshape(o, gy.shape[1], -1),
                               code.reshape(o, gy.shape[1], -1), n, sums,
                               grad_w.reshape(o, kh, kw), grad_b)
    return None

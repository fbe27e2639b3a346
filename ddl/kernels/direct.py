"""Direct convolution for stride-1 layers with few taps (C*kh*kw up to 32: a first layer).

The forward kernels are compiled for their layer's (C, kh, kw), which numba then treats as
constants: the loops over the taps unroll, so one output accumulates all its taps in a register,
for 16 images at a time in the vector lanes of the innermost loop over the batch. (Accumulating
tap by tap in memory, one long multiply-add per tap, ran 3x slower for ref-cnn's first layer;
with one input channel, im2col would copy the images 9 or 25 times to feed a GEMM whose inner
dimension is only 9 or 25.) `pool=True` max-pools 2x2 (and applies ReLU) from the four outputs
of a window, so the full-resolution output is never stored.

Arrays are (C, H, W, N), the batch innermost; the backward kernels see them with the last two
axes merged, (C, H, W*N), so that a row's taps are long unit-stride runs.
"""
import functools

import numpy as np

from ddl.kernels.jit import helper, kernel
from ddl.kernels.pool import first_max4, spread4

X3, X4 = "T[:, :, ::1]", "T[:, :, :, ::1]"
CODE = "uint8[:, :, :, ::1]"
# Kernel sizes compiled ahead by `warm` (others on first use): ref-cnn's and seed-cnn's.
COMMON = ((3, 3), (5, 5))


@helper
def row_grads(x, w, o, r, n, g, grad_w, gx, input_grad):
    """Back through output row r of channel o, given its gradient g (OW*N,): grad_w[o] +=
    the row's weight gradient, gx += its input gradient if input_grad (x, gx as (C, H, W*N)
    views); returns sum(g), the row's bias gradient. Long unit-stride dot products: the
    pooled gradient is too sparse, per image, to gather in registers as the forward does."""
    for c in range(w.shape[1]):
        for i in range(w.shape[2]):
            for j in range(w.shape[3]):
                xs, dot = x[c, r + i, j * n:], x.dtype.type(0)
                if input_grad:      # one pass for both: g is loaded once
                    wv, gxs = w[o, c, i, j], gx[c, r + i, j * n:]
                    for m in range(g.shape[0]):
                        dot += g[m] * xs[m]
                        gxs[m] += wv * g[m]
                else:
                    for m in range(g.shape[0]):
                        dot += g[m] * xs[m]
                grad_w[o, c, i, j] += dot
    return g.sum()


@functools.lru_cache(maxsize=None)
def kernels(kh, kw):
    """(conv, pooled_conv) compiled for kh x kw kernels. The kernels close over those two ints
    and nothing else: numba's cache keys a closure by its contents, and a function among them
    would pickle differently in every process (no cache hit ever)."""

    @kernel(f"({X4}, {X4}, T[::1], {X4})")
    def conv(x, w, bias, y):
        """y (O, OH, OW, N) = the convolution of x (C, H, W, N) with w (O, C, kh, kw) + bias."""
        for o in range(y.shape[0]):
            for r in range(y.shape[1]):
                for q in range(y.shape[2]):
                    out = y[o, r, q]
                    out[:] = bias[o]
                    for c in range(x.shape[0]):       # one input channel at a time: the taps
                        for n in range(out.shape[0]):   # of one channel fill the registers
                            total = out[n]
                            for i in range(kh):
                                for j in range(kw):
                                    total += w[o, c, i, j] * x[c, r + i, q + j, n]
                            out[n] = total

    @kernel(f"({X4}, {X4}, T[::1], boolean, T[:, ::1], {X4}, {CODE})")
    def pooled_conv(x, w, bias, relu, acc, y, code):
        """y, code (O, OH//2, OW//2, N): the convolution max-pooled 2x2 (ReLU'd if relu), with
        each window's code (see pool.py); acc (4, N) is scratch for a window's four outputs."""
        for o in range(y.shape[0]):
            for pr in range(y.shape[1]):
                for pc in range(y.shape[2]):
                    r, q = 2 * pr, 2 * pc
                    acc[:, :] = bias[o]
                    for c in range(x.shape[0]):
                        for n in range(acc.shape[1]):
                            y00, y01, y10, y11 = acc[0, n], acc[1, n], acc[2, n], acc[3, n]
                            for i in range(kh):
                                for j in range(kw):
                                    wv = w[o, c, i, j]
                                    y00 += wv * x[c, r + i, q + j, n]
                                    y01 += wv * x[c, r + i, q + j + 1, n]
                                    y10 += wv * x[c, r + i + 1, q + j, n]
                                    y11 += wv * x[c, r + i + 1, q + j + 1, n]
                            acc[0, n], acc[1, n], acc[2, n], acc[3, n] = y00, y01, y10, y11
                    for n in range(acc.shape[1]):
                        y[o, pr, pc, n], code[o, pr, pc, n] = first_max4(
                            acc[0, n], acc[1, n], acc[2, n], acc[3, n], relu)

    return conv, pooled_conv


@kernel(f"({X3}, {X4}, {X3}, int64, {X4}, T[::1], {X3}, boolean)")
def conv_grad(x, w, gy, n, grad_w, grad_b, gx, input_grad):
    """From gy (O, OH, OW*N): grad_w, grad_b += the parameter gradients; gx (like x, zero
    on entry) += the input gradient if input_grad. x, gx: (C, H, W*N) views."""
    for o in range(gy.shape[0]):
        for r in range(gy.shape[1]):
            grad_b[o] += row_grads(x, w, o, r, n, gy[o, r], grad_w, gx, input_grad)

@kernel(f"({X3}, {X4}, {X3}, uint8[:, :, ::1], int64, T[:, ::1], {X4}, T[::1], {X3}, "
        "boolean)")
def pooled_conv_grad(x, w, gy, code, n, rows, grad_w, grad_b, gx, input_grad):
    """`conv_grad` from the pooled gradient gy and code (O, OH//2, (OW//2)*N): each
    window's gradient goes to its first maximum, in rows (2, OW*N) of scratch."""
    for o in range(gy.shape[0]):
        for pr in range(gy.shape[1]):
            rows[:, :] = 0
            for pc in range(gy.shape[2] // n):
                # Slices first: indices computed from n inside the loop defeat vectorising.
                top, bottom = rows[0, 2 * pc * n:], rows[1, 2 * pc * n:]
                gys, codes = gy[o, pr, pc * n:], code[o, pr, pc * n:]
                for k in range(n):
                    top[k], top[n + k], bottom[k], bottom[n + k] = spread4(gys[k], codes[k])
            for a in range(2):
                grad_b[o] += row_grads(x, w, o, 2 * pr + a, n, rows[a], grad_w, gx,
                                       input_grad)


for _shape in COMMON:
    kernels(*_shape)       # registers them with `warm`


def forward(x, weight, bias, padding, pool, relu, ws):
    """x (C, H, W, N) -> (y, ctx) as winograd.forward, for any kernel size."""
    o, c, kh, kw = weight.shape
    conv, pooled_conv = kernels(kh, kw)
    xp = pad(x, padding, ws)
    oh, ow, n = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1, x.shape[3]
    b = np.zeros(o, x.dtype) if bias is None else bias
    if pool:
        y = np.empty((o, oh // 2, ow // 2, n), x.dtype)
        code = np.empty(y.shape, np.uint8)
        pooled_conv(xp, weight, b, relu, ws.empty("acc", (4, n), x.dtype), y, code)
    else:
        y, code = np.empty((o, oh, ow, n), x.dtype), None
        conv(xp, weight, b, y)
    return y, (x.shape, xp, code)


def backward(gy, ctx, weight, grad_w, grad_b, padding, input_grad, ws):
    """As winograd.backward."""
    x_shape, xp, code = ctx
    kw, n = weight.shape[3], xp.shape[3]
    gxp = np.zeros_like(xp) if input_grad else np.zeros((1, 1, 1, 1), xp.dtype)
    x3, gx3, gy3 = (a.reshape(a.shape[0], a.shape[1], -1) for a in (xp, gxp, gy))
    if code is None:
        conv_grad(x3, weight, gy3, n, grad_w, grad_b, gx3, input_grad)
    else:
        rows = ws.empty("rows", (2, (xp.shape[2] - kw + 1) * n), gy.dtype)
        pooled_conv_grad(x3, weight, gy3, code.reshape(gy3.shape), n, rows, grad_w, grad_b,
                         gx3, input_grad)
    if not input_grad:
        return None
    (ph, pw), (_, h, w, _) = padding, x_shape
    return gxp[:, ph:ph + h, pw:pw + w]


def pad(x, padding, ws, min_hw=(0, 0)):
    """x (C, H, W, N) zero-padded by `padding` and, past that, to at least min_hw rows and
    columns; x itself when it needs neither."""
    (ph, pw), (c, h, w, n) = padding, x.shape
    hp, wp = max(h + 2 * ph, min_hw[0]), max(w + 2 * pw, min_hw[1])
    if (hp, wp) == (h, w):
        return x
    xp = ws.empty("x_padded", (c, hp, wp, n), x.dtype)
    xp[...] = 0
    xp[:, ph:ph + h, pw:pw + w] = x
    return xp

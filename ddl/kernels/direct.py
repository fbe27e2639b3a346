"""Direct convolution for stride-1 layers with few input channels (a network's first layer).

With the batch innermost, one output row of one channel, y[o, r] (OW*N values), is a sum of
C*kh*kw scaled copies of input rows: y[o, r] = sum over c, i, j of w[o, c, i, j] *
x[c, r + i, j*N : j*N + OW*N]. Each term is one long unit-stride multiply-add, which vectorises
well; with one input channel im2col would copy the input 9 or 25 times to feed a GEMM whose inner
dimension is only 9 or 25. The backward pass runs the same loops as dot products (weights) and
multiply-adds (input). `pool=True` max-pools 2x2 (and applies ReLU) from two computed rows at a
time, so the full-resolution output is never stored.

Arrays: x (C, H, W*N) and y (O, OH, OW*N) are (C, H, W, N) memory with the last two axes merged.
"""
import numpy as np

from ddl.kernels.jit import helper, kernel
from ddl.kernels.pool import first_max4, spread4

X3 = "T[:, :, ::1]"


@helper
def _conv_row(x, w, o, r, n, start, out):
    """out (OW*N,) = start + output row r of channel o."""
    for m in range(out.shape[0]):
        out[m] = start
    for c in range(x.shape[0]):
        for i in range(w.shape[2]):
            for j in range(w.shape[3]):
                wv, xs = w[o, c, i, j], x[c, r + i, j * n:]
                for m in range(out.shape[0]):
                    out[m] += wv * xs[m]


@helper
def _row_grads(x, w, o, r, n, g, grad_w, gx, input_grad):
    """Back through output row r of channel o given its gradient g (OW*N,): grad_w[o] += the
    row's weight gradient, gx (like x) += its input gradient if input_grad; returns sum(g), the
    row's bias gradient."""
    for c in range(x.shape[0]):
        for i in range(w.shape[2]):
            for j in range(w.shape[3]):
                xs, dot = x[c, r + i, j * n:], x.dtype.type(0)
                for m in range(g.shape[0]):
                    dot += g[m] * xs[m]
                grad_w[o, c, i, j] += dot
                if input_grad:
                    wv, gxs = w[o, c, i, j], gx[c, r + i, j * n:]
                    for m in range(g.shape[0]):
                        gxs[m] += wv * g[m]
    total = x.dtype.type(0)
    for m in range(g.shape[0]):
        total += g[m]
    return total


@kernel(f"({X3}, T[:, :, :, ::1], T[::1], int64, {X3})")
def conv(x, w, bias, n, y):
    """y (O, OH, OW*N) = the convolution of x (C, H, W*N) with w (O, C, kh, kw), plus bias."""
    for o in range(y.shape[0]):
        for r in range(y.shape[1]):
            _conv_row(x, w, o, r, n, bias[o], y[o, r])


@kernel(f"({X3}, T[:, :, :, ::1], T[::1], int64, boolean, T[:, ::1], {X3}, uint8[:, :, ::1])")
def pooled_conv(x, w, bias, n, relu, rows, y, code):
    """y, code (O, OH//2, (OW//2)*N): the convolution max-pooled 2x2 (ReLU'd if relu), with each
    window's code (see pool.py); rows (2, OW*N) is scratch."""
    for o in range(y.shape[0]):
        for pr in range(y.shape[1]):
            _conv_row(x, w, o, 2 * pr, n, bias[o], rows[0])
            _conv_row(x, w, o, 2 * pr + 1, n, bias[o], rows[1])
            for pc in range(y.shape[2] // n):
                # Slices first: indices computed from n inside the loop would defeat vectorising.
                top, bottom = rows[0, 2 * pc * n:], rows[1, 2 * pc * n:]
                ys, codes = y[o, pr, pc * n:], code[o, pr, pc * n:]
                for k in range(n):
                    ys[k], codes[k] = first_max4(top[k], top[n + k], bottom[k], bottom[n + k],
                                                 relu)


@kernel(f"({X3}, T[:, :, :, ::1], {X3}, int64, T[:, :, :, ::1], T[::1], {X3}, boolean)")
def conv_grad(x, w, gy, n, grad_w, grad_b, gx, input_grad):
    """From gy (O, OH, OW*N): grad_w, grad_b += the parameter gradients; gx (C, H, W*N), zero
    on entry, += the input gradient if input_grad."""
    for o in range(gy.shape[0]):
        for r in range(gy.shape[1]):
            grad_b[o] += _row_grads(x, w, o, r, n, gy[o, r], grad_w, gx, input_grad)


@kernel(f"({X3}, T[:, :, :, ::1], {X3}, uint8[:, :, ::1], int64, T[:, ::1], T[:, :, :, ::1], "
        f"T[::1], {X3}, boolean)")
def pooled_conv_grad(x, w, gy, code, n, rows, grad_w, grad_b, gx, input_grad):
    """`conv_grad` from the pooled gradient gy and code (O, OH//2, (OW//2)*N): each window's
    gradient goes to its first maximum; rows (2, OW*N) is scratch."""
    for o in range(gy.shape[0]):
        for pr in range(gy.shape[1]):
            rows[:, :] = 0
            for pc in range(gy.shape[2] // n):
                top, bottom = rows[0, 2 * pc * n:], rows[1, 2 * pc * n:]
                gys, codes = gy[o, pr, pc * n:], code[o, pr, pc * n:]
                for k in range(n):
                    top[k], top[n + k], bottom[k], bottom[n + k] = spread4(gys[k], codes[k])
            for a in range(2):
                grad_b[o] += _row_grads(x, w, o, 2 * pr + a, n, rows[a], grad_w, gx, input_grad)


def forward(x, weight, bias, padding, pool, relu, ws):
    """x (C, H, W, N) -> (y, ctx) as winograd.forward, for any kernel size."""
    c, h, w, n = x.shape
    o, _, kh, kw = weight.shape
    xp = pad(x, padding, ws)
    oh, ow = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
    x3 = xp.reshape(c, xp.shape[1], -1)
    b = np.zeros(o, x.dtype) if bias is None else bias
    if pool:
        y = np.empty((o, oh // 2, ow // 2, n), x.dtype)
        code = np.empty(y.shape, np.uint8)
        rows = ws.empty("rows", (2, ow * n), x.dtype)
        pooled_conv(x3, weight, b, n, relu, rows, y.reshape(o, oh // 2, -1),
                       code.reshape(o, oh // 2, -1))
    else:
        y, code = np.empty((o, oh, ow, n), x.dtype), None
        conv(x3, weight, b, n, y.reshape(o, oh, -1))
    return y, (x.shape, xp, code)


def backward(gy, ctx, weight, grad_w, grad_b, padding, input_grad, ws):
    """As winograd.backward."""
    x_shape, xp, code = ctx
    c, hp, wp, n = xp.shape
    o = weight.shape[0]
    x3 = xp.reshape(c, hp, -1)
    gxp = np.zeros_like(xp) if input_grad else np.zeros((1, 1, 1, 1), xp.dtype)
    gx3 = gxp.reshape(gxp.shape[0], gxp.shape[1], -1)
    gy3 = gy.reshape(o, gy.shape[1], -1)
    if code is None:
        conv_grad(x3, weight, gy3, n, grad_w, grad_b, gx3, input_grad)
    else:
        rows = ws.empty("rows", (2, (wp - weight.shape[3] + 1) * n), gy.dtype)
        pooled_conv_grad(x3, weight, gy3, code.reshape(gy3.shape), n, rows, grad_w, grad_b, gx3,
                        input_grad)
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

"""Direct convolution for stride-1 layers that Winograd does not take (few input channels, or
kernels other than 3x3): a network's first layer, seed-cnn's 5x5 layers.

Arrays are (C, H, W, N), the batch innermost, seen here with the last two axes merged,
(C, H, W*N): one output row of one channel, y[o, r] (OW*N values), is then a sum of shifted
input rows, y[o, r, m] = sum over c, i, j of w[o, c, i, j] * x[c, r + i, j*N + m], a long
unit-stride loop. The forward kernel is compiled per kernel size, which numba then treats as
constants: the kh*kw taps unroll inside that loop, so each output accumulates a channel's taps in
a register (tap by tap through memory, it ran several times slower; with one input channel,
im2col would copy the images 9 or 25 times to feed a GEMM whose inner dimension is only 9 or
25). `pool=True` max-pools 2x2 (and applies ReLU) from two rows at a time, so the
full-resolution output is never stored. The backward pass walks the same rows: dot products for
the weights, and for the input a gather of the gradient row through the taps.
"""
import functools

import numpy as np

from ddl.kernels.jit import X3, X4, kernel
from ddl.kernels.pool import first_max4, spread4

# Kernel sizes compiled ahead by `warm` (others on first use): ref-cnn's and seed-cnn's.
COMMON = ((3, 3), (5, 5))


@functools.lru_cache(maxsize=None)
def forward_kernel(kh, kw):
    """The forward kernel compiled for kh x kw kernels. It closes over those two ints and
    nothing else: numba's cache keys a closure by its contents, and a function among them would
    pickle differently in every process (no cache hit ever)."""

    @kernel(f"({X3}, {X4}, T[::1], int64, boolean, boolean, T[:, ::1], {X3}, uint8[:, :, ::1])")
    def conv(x, w, bias, n, pool, relu, rows, y, code):
        """y (O, OH, OW*N) = the convolution of x (C, H, W*N) with w (O, C, kh, kw) plus bias;
        with `pool`, y and code (O, OH//2, (OW//2)*N) hold it max-pooled 2x2 (ReLU'd if relu)
        and each window's code (see pool.py), from two rows at a time in rows (2, OW*N)."""
        # Unsigned offsets: numba checks signed indices for wrap-around, which kept LLVM from
        # proving `j * n + m` contiguous and made every load a gather.
        nu, width = np.uint64(n), np.uint64(rows.shape[1])
        for o in range(y.shape[0]):
            for out_row in range(y.shape[1]):
                for a in range(2 if pool else 1):
                    r = 2 * out_row + a if pool else out_row
                    out = rows[a] if pool else y[o, r]
                    out[:] = bias[o]
                    for c in range(x.shape[0]):     # a channel's taps accumulate in registers
                        for m in range(width):
                            total = out[m]
                            for i in range(kh):
                                xs = x[c, r + i]
                                for j in range(kw):
                                    total += w[o, c, i, j] * xs[np.uint64(j) * nu + m]
                            out[m] = total
                if pool:
                    for pc in range(y.shape[2] // n):
                        top, bottom = rows[0, 2 * pc * n:], rows[1, 2 * pc * n:]
                        ys, codes = y[o, out_row, pc * n:], code[o, out_row, pc * n:]
                        for k in range(n):
                            ys[k], codes[k] = first_max4(top[k], top[n + k], bottom[k],
                                                         bottom[n + k], relu)

    return conv


@functools.lru_cache(maxsize=None)
def backward_kernel(kh, kw):
    """The backward kernel compiled for kh x kw kernels (closing over two ints only, as above).
    """

    @kernel(f"({X3}, {X4}, {X3}, uint8[:, :, ::1], int64, boolean, T[:, ::1], {X4}, T[::1], "
            f"{X3}, boolean)")
    def conv_grad(x, w, gy, code, n, pool, rows, grad_w, grad_b, gx, input_grad):
        """From gy (O, OH, OW*N), or with `pool` from the pooled gradient gy and code
        (O, OH//2, (OW//2)*N) (each window's gradient reaching its first maximum): grad_w and
        grad_b += the parameter gradients; gx (like x, zero on entry) += the input gradient if
        input_grad. rows (2, (OW + 2*(kw-1))*N) is scratch: gradient rows between kw-1 columns
        of zeros on either side, so that the input gradient reads them without bounds checks."""
        nu, side = np.uint64(n), (kw - 1) * n
        width = rows.shape[1] - 2 * side                  # OW*N
        rows[:, :] = 0
        for o in range(gy.shape[0]):
            for out_row in range(gy.shape[1]):
                if pool:
                    for pc in range(gy.shape[2] // n):
                        top = rows[0, side + 2 * pc * n:]
                        bottom = rows[1, side + 2 * pc * n:]
                        gys, codes = gy[o, out_row, pc * n:], code[o, out_row, pc * n:]
                        for k in range(n):
                            top[k], top[n + k], bottom[k], bottom[n + k] = spread4(gys[k],
                                                                                   codes[k])
                else:
                    rows[0, side:side + width] = gy[o, out_row]
                for a in range(2 if pool else 1):
                    r = 2 * out_row + a if pool else out_row
                    padded = rows[a]
                    g = padded[side:side + width]
                    grad_b[o] += g.sum()
                    for c in range(x.shape[0]):
                        for i in range(kh):
                            xs = x[c, r + i]
                            # Up to five taps of a kernel row accumulate in registers at once
                            # (numba cannot hold a variable number of scalars): 1.4-1.8x the
                            # speed of one dot product per tap, which loads g every time.
                            for j0 in range(0, kw, 5):
                                a0 = a1 = a2 = a3 = a4 = x.dtype.type(0)
                                for m in range(np.uint64(width)):
                                    gv, at = g[m], np.uint64(j0) * nu + m
                                    a0 += gv * xs[at]
                                    if j0 + 1 < kw:
                                        a1 += gv * xs[at + nu]
                                    if j0 + 2 < kw:
                                        a2 += gv * xs[at + np.uint64(2) * nu]
                                    if j0 + 3 < kw:
                                        a3 += gv * xs[at + np.uint64(3) * nu]
                                    if j0 + 4 < kw:
                                        a4 += gv * xs[at + np.uint64(4) * nu]
                                for t, total in enumerate((a0, a1, a2, a3, a4)):
                                    if j0 + t < kw:
                                        grad_w[o, c, i, j0 + t] += total
                            if input_grad:
                                # gx[c, r + i, m] gathers g[m - j*N] over the taps, zero past
                                # the row's ends: one store per kw multiply-adds.
                                gxs = gx[c, r + i]
                                for m in range(np.uint64(gxs.shape[0])):
                                    total = gxs[m]
                                    for j in range(kw):
                                        total += w[o, c, i, j] * padded[
                                            np.uint64(kw - 1 - j) * nu + m]
                                    gxs[m] = total

    return conv_grad


for _shape in COMMON:                  # registers them with `warm`
    forward_kernel(*_shape)
    backward_kernel(*_shape)


def forward(x, weight, bias, padding, pool, relu, ws):
    """x (C, H, W, N) -> (y, ctx) as winograd.forward, for any kernel size."""
    o, c, kh, kw = weight.shape
    xp = pad(x, padding, ws)
    oh, ow, n = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1, x.shape[3]
    rows = ws.empty("rows", (2, ow * n), x.dtype)
    y_hw = (oh // 2, ow // 2) if pool else (oh, ow)
    y = np.empty((o, *y_hw, n), x.dtype)
    code = np.empty(y.shape, np.uint8) if pool else None
    forward_kernel(kh, kw)(xp.reshape(c, xp.shape[1], -1), weight, bias, n, pool, relu, rows,
                           y.reshape(o, y_hw[0], -1),
                           code.reshape(o, y_hw[0], -1) if pool else np.empty((1, 1, 1), np.uint8))
    return y, (xp, code)


def backward(gy, ctx, weight, grad_w, grad_b, input_grad, ws):
    """As winograd.backward."""
    xp, code = ctx
    kh, kw = weight.shape[2:]
    n = xp.shape[3]
    gxp = np.zeros_like(xp) if input_grad else np.zeros((1, 1, 1, 1), xp.dtype)
    x3, gx3, gy3 = (a.reshape(a.shape[0], a.shape[1], -1) for a in (xp, gxp, gy))
    rows = ws.empty("grad_rows", (2, (xp.shape[2] + kw - 1) * n), gy.dtype)
    code3 = np.empty((1, 1, 1), np.uint8) if code is None else code.reshape(gy3.shape)
    backward_kernel(kh, kw)(x3, weight, gy3, code3, n, code is not None, rows, grad_w, grad_b,
                            gx3, input_grad)
    return gxp if input_grad else None


def pad(x, padding, ws, min_hw=(0, 0)):
    """x (C, H, W, N) zero-padded by `padding` and, past that, to at least min_hw rows and
    columns; x itself when it needs neither."""
    (ph, pw), (c, h, w, n) = padding, x.shape
    hp, wp = max(h + 2 * ph, min_hw[0]), max(w + 2 * pw, min_hw[1])
    if (hp, wp) == (h, w):
        return x
    # One layer's inputs have one shape and padding (the buffer's name says which), so the
    # border, zeroed once, stays zero.
    xp = ws.zeros(f"x_padded {padding}", (c, hp, wp, n), x.dtype)
    xp[:, ph:ph + h, pw:pw + w] = x
    return xp

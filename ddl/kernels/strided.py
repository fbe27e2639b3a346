"""Strided convolutions larger than 1x1 (ResNet's and VGG's 3x3 layers of stride 2) as direct
loops over the input split into its stride's phases.

Phase (a, b) of the zero-padded input holds every sh-th row from row a and every sw-th column
from column b: xph[c, a, b, R, Q] = x[c, R*sh + a - ph, Q*sw + b - pw] (N values, zeros in the
padding). Tap (i, j) of output pixel (r, q) reads padded pixel (r*sh + i, q*sw + j), which is
phase (i % sh, j % sw) at (r + i // sh, q + j // sw): with the last two axes merged, one output
row y[o, r] (OW*N values) is again a sum of shifted unit-stride rows, as in the direct kernel
(direct.py), y[o, r, m] = sum over c, i, j of w[o, c, i, j] * xph[c, i % sh, j % sw,
r + i // sh, (j // sw)*N + m]. The split is gemm.py's im2col packing with the phases for taps:
one copy that also pads, of C*H*W*N values where im2col's panel has C*kh*kw*OH*OW*N (2.25x that
for 3x3 of stride 2), and only of the phases that some tap reads. The weight gradient is
direct.py's weight-gradient loop over the same phases.

The input gradient stays one GEMM, W^T @ grad y, giving every tap's gradient, but `fold` then
gathers each input pixel's taps and writes the pixel once, where gemm.unpack_add zeroes the
input gradient and adds every tap into it. Per-part medians, thread CPU time, 16 -> 32
channels on 28x28 at batch 64, float32, on a loaded 2-core Xeon (2026-12-06): split 0.55 ms and
the phase kernel 1.76, vs im2col 0.89 and the GEMM 2.13; weight gradient 1.61 vs the GEMM's
2.39; after the input gradient's GEMM (1.68), fold 0.98 vs zeroing and unpack_add 1.79. With
32 -> 64 channels on 14x14 the two ways came out even.
"""
import functools

import numpy as np

from ddl.kernels import arrays, direct, gemm
from ddl.kernels.jit import X3, X4, kernel

X5 = "T[:, :, :, :, ::1]"
# (kernel, stride) compiled ahead by `warm`: ResNet's and VGG's 3x3 layers of stride 2.
COMMON = (((3, 3), (2, 2)),)
CHUNK = direct.CHUNK


@kernel(f"({X4}, int64, int64, int64, int64, int64, int64, {X4})")
def fold(gcols, kh, kw, sh, sw, ph, pw, gx):
    """The adjoint of gemm.pack, gathered: gx[c, row, col] = the sum of gcols[(c*kh + i)*kw + j,
    r, q] over the taps with r*sh + i - ph = row and q*sw + j - pw = col: gcols (C*kh*kw, OH,
    OW, N), gx (C, H, W, N). (gemm.unpack_add scatters the taps into a zeroed gx instead: every
    pixel loaded and stored once per tap.)"""
    oh, ow, n = gcols.shape[1], gcols.shape[2], gx.shape[3]
    for c in range(gx.shape[0]):
        for row in range(gx.shape[1]):
            # The taps i that reach this row, i0, i0 + sh, ..., from output rows top, top - 1,
            # ...: one division a row and one a column, none a tap.
            top, i0 = divmod(row + ph, sh)
            for col in range(gx.shape[2]):
                left, j0 = divmod(col + pw, sw)
                dst = gx[c, row, col]
                dst[:] = 0
                r = top
                for i in range(i0, kh, sh):
                    if 0 <= r < oh:
                        q = left
                        for j in range(j0, kw, sw):
                            if 0 <= q < ow:
                                src = gcols[(c * kh + i) * kw + j, r, q]
                                for m in range(n):
                                    dst[m] += src[m]
                            q -= 1
                    r -= 1


@functools.lru_cache(maxsize=None)
def forward_kernel(kh, kw, sh, sw):
    """The forward kernel compiled for kh x kw kernels of stride (sh, sw) (closing over four
    ints only, as direct.forward_kernel does, for numba's cache)."""

    @kernel(f"({X5}, {X4}, T[::1], int64, {X3})")
    def conv(x, w, bias, n, y):
        """y (O, OH, OW*N) = the convolution of the input with w (O, C, kh, kw) plus bias, O a
        multiple of 4, from its phases x (C, A, B, HQ, WQ*N)."""
        nu, width = np.uint64(n), np.uint64(y.shape[2])
        for r in range(y.shape[1]):
            for o in range(0, y.shape[0], 4):
                y0, y1, y2, y3 = y[o, r], y[o + 1, r], y[o + 2, r], y[o + 3, r]
                y0[:], y1[:], y2[:], y3[:] = bias[o], bias[o + 1], bias[o + 2], bias[o + 3]
                for m0 in range(0, width, CHUNK):
                    for c in range(x.shape[0]):
                        for m in range(m0, min(m0 + CHUNK, width)):
                            t0, t1, t2, t3 = y0[m], y1[m], y2[m], y3[m]
                            for i in range(kh):
                                for j in range(kw):
                                    v = x[c, i % sh, j % sw, r + i // sh][
                                        np.uint64(j // sw) * nu + m]
                                    t0 += w[o, c, i, j] * v
                                    t1 += w[o + 1, c, i, j] * v
                                    t2 += w[o + 2, c, i, j] * v
                                    t3 += w[o + 3, c, i, j] * v
                            y0[m], y1[m], y2[m], y3[m] = t0, t1, t2, t3

    return conv


@functools.lru_cache(maxsize=None)
def weight_grad_kernel(kh, kw, sh, sw):
    """The weight-gradient kernel compiled for kh x kw kernels of stride (sh, sw)."""

    @kernel(f"({X5}, {X3}, int64, {X4}, T[::1])")
    def conv_weight_grad(x, g, n, grad_w, grad_b):
        """grad_w (O', C, kh, kw) += the weight gradient and grad_b (O',) += the bias gradient,
        from the input's phases x (C, A, B, HQ, WQ*N) and the output gradient g (O', OH, OW*N),
        O' a multiple of 4."""
        nu, width = np.uint64(n), np.uint64(g.shape[2])
        for r in range(g.shape[1]):
            for o in range(0, g.shape[0], 4):
                g0, g1, g2, g3 = g[o, r], g[o + 1, r], g[o + 2, r], g[o + 3, r]
                for b, gb in enumerate((g0, g1, g2, g3)):
                    grad_b[o + b] += gb.sum()
                for c in range(x.shape[0]):
                    for i in range(kh):
                        a, row = i % sh, r + i // sh
                        for j0 in range(0, kw, 3):      # each tap's row in its own phase
                            j1, j2 = min(j0 + 1, kw - 1), min(j0 + 2, kw - 1)
                            direct.add_taps(g0, g1, g2, g3,
                                            x[c, a, j0 % sw, row, np.uint64(j0 // sw) * nu:],
                                            x[c, a, j1 % sw, row, np.uint64(j1 // sw) * nu:],
                                            x[c, a, j2 % sw, row, np.uint64(j2 // sw) * nu:],
                                            width, kw - j0, grad_w, o, c, i, j0)

    return conv_weight_grad


for _kernel, _stride in COMMON:                  # registers them with `warm`
    forward_kernel(*_kernel, *_stride)
    weight_grad_kernel(*_kernel, *_stride)


def fits(weight_shape, stride, padding):
    """Whether these kernels take the layer: a stride above 1 on some axis and a kernel larger
    than 1x1 (a padding as large as the kernel only leaves outputs that see zeros). A 1x1
    layer's phase is the panel of one GEMM, which gemm.py's pack makes: there the phase kernel,
    one multiply-add per input value loaded, took twice the GEMM's time."""
    return stride != (1, 1) and weight_shape[2:] != (1, 1)


def _phases(x, weight, stride, padding, out_hw, ws):
    """The phases of x (C, H, W, N) that the taps read: (C, A, B, HQ, WQ, N)."""
    (kh, kw), (sh, sw), (oh, ow) = weight.shape[2:], stride, out_hw
    shape = (x.shape[0], min(sh, kh), min(sw, kw), oh + (kh - 1) // sh, ow + (kw - 1) // sw,
             x.shape[3])
    xph = ws.empty("phases", shape, x.dtype)
    # im2col's packing with the phases for taps: row (c, a, b) of its panel is phase (a, b)
    gemm.pack(x, shape[1], shape[2], sh, sw, *padding, xph.reshape(-1, *shape[3:]))
    return xph


def forward(x, weight, bias, stride, padding, out_hw, ws):
    """y (O, OH, OW, N) of x (C, H, W, N), weight (O, C, kh, kw) and bias (O,) or None; the ctx for
    `backward` holds the phases (in the Workspace `ws`)."""
    (o, _, kh, kw), n = weight.shape, x.shape[3]
    xph = _phases(x, weight, stride, padding, out_hw, ws)
    op = direct.blocks(o)
    bias = np.zeros(o, x.dtype) if bias is None else bias
    y = arrays.empty((op, *out_hw, n), x.dtype)
    forward_kernel(kh, kw, *stride)(xph.reshape(*xph.shape[:4], -1), direct.padded(weight, op),
                                    direct.padded(bias, op), n, y.reshape(op, out_hw[0], -1))
    return y[:o], (xph, stride, padding, x.shape)


def backward(gy, ctx, weight, grad_w, grad_b, input_grad, ws):
    """grad_w and grad_b (zeroed by the caller) += the parameters' gradients from gy (O, OH,
    OW, N); returns the input's gradient (C, H, W, N), or None unless input_grad."""
    xph, stride, padding, x_shape = ctx
    o, c, kh, kw = weight.shape
    _weight_grad(xph, gy, weight, grad_w, grad_b, stride)
    if not input_grad:
        return None
    # The input gradient as im2col's adjoint (gemm.py): one GEMM gives every tap's gradient,
    # which `fold` gathers into each input pixel, written once.
    gm = gy.reshape(o, -1)
    gcols = ws.empty("panel_grad", (c * kh * kw, gm.shape[1]), gm.dtype)
    np.matmul(weight.reshape(o, -1).T, gm, out=gcols)
    gx = arrays.empty(x_shape, gy.dtype)
    fold(gcols.reshape(len(gcols), *gy.shape[1:]), kh, kw, *stride, *padding, gx)
    return gx


def _weight_grad(xph, gy, weight, grad_w, grad_b, stride):
    """grad_w, grad_b += the weight_grad_kernel's sums, its O' - O extra channels dropped."""
    o, _, kh, kw = weight.shape
    op = direct.blocks(o)
    g = direct.padded(gy, op)
    gw = grad_w if op == o else np.zeros((op, *grad_w.shape[1:]), grad_w.dtype)
    gb = grad_b if op == o else np.zeros(op, grad_b.dtype)
    weight_grad_kernel(kh, kw, *stride)(xph.reshape(*xph.shape[:4], -1),
                                        g.reshape(*g.shape[:2], -1), gy.shape[3], gw, gb)
    if op != o:
        grad_w += gw[:o]
        grad_b += gb[:o]

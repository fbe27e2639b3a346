"""Convolutions as one BLAS GEMM on a packed panel: strided layers and 1x1 layers, which neither
Winograd nor the direct kernel takes.

The panel is im2col's columns, cols (C*kh*kw, OH, OW, N): row (c, i, j) holds, for every output
pixel, the N input values under tap (i, j) of channel c, zeros where the tap falls in the padding.
A compiled loop packs it straight from the (C, H, W, N) activations, copying runs of N values (no
padded copy of the input, no NumPy pass per tap), and y (O, OH*OW*N) = W (O, C*kh*kw) @ cols is
one GEMM. Backward: grad W = grad y @ cols^T, and the input's gradient W^T @ grad y, added back
through the taps by the adjoint loop. An unpadded 1x1 layer of stride 1 needs no panel: x itself
is one, seen as (C, H*W*N).
"""
import numpy as np

from ddl.kernels import arrays
from ddl.kernels.jit import X4, kernel


@kernel(f"({X4}, int64, int64, int64, int64, int64, int64, {X4})")
def pack(x, kh, kw, sh, sw, ph, pw, cols):
    """cols[(c*kh + i)*kw + j, r, q] = x[c, r*sh + i - ph, q*sw + j - pw] (N values), or zeros
    outside x: x (C, H, W, N), cols (C*kh*kw, OH, OW, N)."""
    h, w, n = x.shape[1], x.shape[2], x.shape[3]
    for c in range(x.shape[0]):
        for i in range(kh):
            for j in range(kw):
                k = (c * kh + i) * kw + j
                for r in range(cols.shape[1]):
                    row = r * sh + i - ph
                    for q in range(cols.shape[2]):
                        col = q * sw + j - pw
                        dst = cols[k, r, q]
                        if 0 <= row < h and 0 <= col < w:
                            src = x[c, row, col]
                            for m in range(n):
                                dst[m] = src[m]
                        else:
                            for m in range(n):
                                dst[m] = 0


@kernel(f"({X4}, int64, int64, int64, int64, int64, int64, {X4})")
def unpack_add(gcols, kh, kw, sh, sw, ph, pw, gx):
    """The adjoint of `pack`: gx[c, r*sh + i - ph, q*sw + j - pw] += gcols[(c*kh + i)*kw + j, r,
    q] inside gx; gx (C, H, W, N) zeroed by the caller."""
    h, w, n = gx.shape[1], gx.shape[2], gx.shape[3]
    for c in range(gx.shape[0]):
        for i in range(kh):
            for j in range(kw):
                k = (c * kh + i) * kw + j
                for r in range(gcols.shape[1]):
                    row = r * sh + i - ph
                    if 0 <= row < h:
                        for q in range(gcols.shape[2]):
                            col = q * sw + j - pw
                            if 0 <= col < w:
                                src, dst = gcols[k, r, q], gx[c, row, col]
                                for m in range(n):
                                    dst[m] += src[m]


def forward(x, weight, bias, stride, padding, out_hw, ws):
    """y (O, OH, OW, N) of x (C, H, W, N) and weight (O, C, kh, kw), bias (O,) or None; and the
    ctx for `backward`: the panel (C*kh*kw, OH*OW*N), which lives in the Workspace `ws`."""
    o, c, kh, kw = weight.shape
    n = x.shape[3]
    if (kh, kw, *stride, *padding) == (1, 1, 1, 1, 0, 0):
        cols = x.reshape(c, -1)
    else:
        cols = ws.empty("panel", (c * kh * kw, *out_hw, n), x.dtype)
        pack(x, kh, kw, *stride, *padding, cols)
        cols = cols.reshape(len(cols), -1)
    y = np.matmul(weight.reshape(o, -1), cols, out=arrays.empty((o, cols.shape[1]), x.dtype))
    if bias is not None:
        y += bias[:, None]
    return y.reshape(o, *out_hw, n), cols


def backward(gy, cols, weight, x_shape, stride, padding, input_grad, ws):
    """(grad x (C, H, W, N) or None unless input_grad, grad weight, grad bias) from gy (O, OH,
    OW, N) and forward's ctx; x_shape (C, H, W, N)."""
    o, c, kh, kw = weight.shape
    gm = gy.reshape(o, -1)
    grad_w = (gm @ cols.T).reshape(weight.shape)
    grad_b = gm.sum(axis=1)
    if not input_grad:
        return None, grad_w, grad_b
    wm = weight.reshape(o, -1)
    if (kh, kw, *stride, *padding) == (1, 1, 1, 1, 0, 0):
        gx = np.matmul(wm.T, gm, out=arrays.empty((c, gm.shape[1]), gm.dtype))
        return gx.reshape(x_shape), grad_w, grad_b
    gcols = ws.empty("panel_grad", (c * kh * kw, gm.shape[1]), gm.dtype)
    np.matmul(wm.T, gm, out=gcols)
    gx = arrays.zeros(x_shape, gm.dtype)
    unpack_add(gcols.reshape(len(gcols), *gy.shape[1:]), kh, kw, *stride, *padding, gx)
    return gx, grad_w, grad_b

"""Array kernels shared by the layers: im2col convolution and 2-D pooling.

Layout note: the convolution works internally in (C, N, H, W) memory order. Its columns matrix is
(C*kh*kw, N*OH*OW), so the single GEMM `W @ cols` yields (O, N*OH*OW) and the NCHW output is just
a transposed view of it. A following ReLU/pool keeps that memory order and the next convolution's
(C, N, H, W) padded copy is then a contiguous memcpy. Nothing outside this file relies on it:
every function takes and returns logically NCHW arrays.
"""
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def pair(v):
    """An int or a (h, w) pair as a (h, w) tuple of ints."""
    h, w = (v, v) if np.isscalar(v) else v
    return int(h), int(w)


def out_size(size, kernel, stride, padding=0):
    """Output length along one axis (PyTorch's floor mode)."""
    out = (size + 2 * padding - kernel) // stride + 1
    if out < 1:
        raise ValueError(f"kernel {kernel} larger than padded input {size + 2 * padding}")
    return out


def taps(a, kernel, stride, out_hw):
    """The kh*kw strided views (..., OH, OW) of a (..., H, W), one per kernel position (tap),
    in row-major kernel order: tap (i, j) holds a[..., i + sh*r, j + sw*q] at (r, q)."""
    (kh, kw), (sh, sw), (oh, ow) = kernel, stride, out_hw
    return [a[..., i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]
            for i in range(kh) for j in range(kw)]


# --- convolution ----------------------------------------------------------------------------------
def conv2d_forward(x, weight, bias, stride, padding):
    """x (N, C, H, W), weight (O, C, kh, kw), bias (O,) or None -> (y (N, O, OH, OW), cols).

    `cols` (C*kh*kw, N*OH*OW) is what `conv2d_backward` needs; keep it.
    """
    (sh, sw), (ph, pw) = stride, padding
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    oh, ow = out_size(h, kh, sh, ph), out_size(w, kw, sw, pw)
    xc = x.transpose(1, 0, 2, 3)
    if ph or pw:
        xp = np.zeros((c, n, h + 2 * ph, w + 2 * pw), dtype=x.dtype)
        xp[:, :, ph:ph + h, pw:pw + w] = xc
        xc = xp
    win = sliding_window_view(xc, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]  # (C, N, OH, OW, kh, kw)
    cols = win.transpose(0, 4, 5, 1, 2, 3).reshape(c * kh * kw, n * oh * ow)  # the one copy
    y = weight.reshape(o, -1) @ cols  # (O, N*OH*OW): one BLAS gemm
    if bias is not None:
        y += bias[:, None]
    return y.reshape(o, n, oh, ow).transpose(1, 0, 2, 3), cols


def conv2d_backward(grad_y, cols, weight, x_shape, stride, padding):
    """grad_y (N, O, OH, OW) -> (grad_x (N, C, H, W), grad_weight like weight, grad_bias (O,))."""
    ph, pw = padding
    n, c, h, w = x_shape
    o, _, kh, kw = weight.shape
    oh, ow = grad_y.shape[2:]
    gy = grad_y.transpose(1, 0, 2, 3).reshape(o, n * oh * ow)
    grad_w = (gy @ cols.T).reshape(weight.shape)
    grad_b = gy.sum(axis=1)
    gcols = (weight.reshape(o, -1).T @ gy).reshape(c, kh * kw, n, oh, ow)
    # Overlapping windows share input pixels; summing tap by tap (kh*kw strided adds, each over
    # the whole batch) is the scatter of col2im without np.add.at's per-element cost.
    gxp = np.zeros((c, n, h + 2 * ph, w + 2 * pw), dtype=gcols.dtype)
    for k, v in enumerate(taps(gxp, (kh, kw), stride, (oh, ow))):
        v += gcols[:, k]
    return gxp[:, :, ph:ph + h, pw:pw + w].transpose(1, 0, 2, 3), grad_w, grad_b


# --- pooling --------------------------------------------------------------------------------------
# Pooling works tap by tap: kh*kw elementwise passes over strided (N, C, OH, OW) views, one per
# window position. Measured on (64, 32, 28, 28) float32, that is about 5x faster than building a
# (..., kh*kw) window copy and reducing it with max/argmax/mean: NumPy reductions over a tiny last
# axis pay a per-window overhead. Non-overlapping windows (stride == kernel) are just taps that
# never meet, so they need no separate path.
def pool_taps(x, kernel, stride):
    """`taps` of x (N, C, H, W) for an unpadded pooling window."""
    out_hw = [out_size(size, k, s) for size, k, s in zip(x.shape[2:], kernel, stride)]
    return taps(x, kernel, stride, out_hw)


def maxpool2d_forward(x, kernel, stride):
    """x (N, C, H, W) -> (y (N, C, OH, OW), argmax (N, C, OH, OW) row-major index in the window).

    argmax is the FIRST maximum in row-major window order, as PyTorch's; ties are common
    (all-zero MNIST borders after ReLU) and must neither split nor duplicate the gradient.
    """
    taps = pool_taps(x, kernel, stride)
    y = taps[0].copy()
    for v in taps[1:]:
        np.maximum(y, v, out=y)
    # Index of the first tap equal to the max = how many leading taps all differ from it.
    not_yet = taps[0] != y
    arg = not_yet.astype(np.min_scalar_type(len(taps)))
    for v in taps[1:-1]:
        not_yet &= v != y
        arg += not_yet
    return y, arg


def maxpool2d_backward(grad_y, arg, x_shape, kernel, stride):
    """grad_y (N, C, OH, OW) -> grad_x (N, C, H, W), all of each window's gradient on its argmax."""
    grad_x = np.zeros(x_shape, dtype=grad_y.dtype)
    for k, v in enumerate(pool_taps(grad_x, kernel, stride)):
        v += grad_y * (arg == k)  # += : overlapping windows may pick the same pixel
    return grad_x


def avgpool2d_forward(x, kernel, stride):
    """x (N, C, H, W) -> y (N, C, OH, OW), the mean of each window."""
    taps = pool_taps(x, kernel, stride)
    y = taps[0].copy()
    for v in taps[1:]:
        y += v
    y /= len(taps)
    return y


def avgpool2d_backward(grad_y, x_shape, kernel, stride):
    """grad_y (N, C, OH, OW) -> grad_x (N, C, H, W): each window's gradient spread evenly."""
    g = grad_y / (kernel[0] * kernel[1])
    grad_x = np.zeros(x_shape, dtype=g.dtype)
    for v in pool_taps(grad_x, kernel, stride):
        v += g
    return grad_x

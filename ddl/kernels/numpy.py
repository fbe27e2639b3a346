"""The NumPy backend, the readable reference: im2col convolution, 2-D pooling, ReLU, the
cross-entropy, the optimizers' update rules, array allocation and `plan`.

`ddl.kernels.use("numpy")` runs it; ddl/kernels/numba.py offers the same operations
(ddl.kernels.OPERATIONS) compiled with numba, each tested against its twin here.

Layout note: the convolution keeps activations in (C, H, W, N) memory order, channels outermost
and the batch innermost. Its columns matrix is then (C*kh*kw, OH*OW*N), built from kh*kw copies
whose inner runs are whole (OW, N) rows; the GEMM `W @ cols` yields (O, OH*OW*N), and the NCHW
output is a transposed view of it. ReLU and pooling preserve whatever memory order they are given
(NumPy allocates elementwise results in their input's order), so the next convolution finds its
input already in place, and Flatten of (C, H, W, N) memory is a free (N, C*H*W) transposed view.
The numba backend keeps the same memory order; every function of both takes and returns
logically NCHW arrays, whatever their memory order.
"""
import math

import numpy as np

from ddl.kernels.arrays import Workspace, chwn, nchw, out_size

name = "numpy"


def taps(a, kernel, stride, out_hw):
    """The kh*kw strided views (..., OH, OW) of a (..., H, W), one per kernel position (tap),
    in row-major kernel order: tap (i, j) holds a[..., i + sh*r, j + sw*q] at (r, q)."""
    (kh, kw), (sh, sw), (oh, ow) = kernel, stride, out_hw
    return [a[..., i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]
            for i in range(kh) for j in range(kw)]


# --- convolution ----------------------------------------------------------------------------------
def _chwn(x, padding):
    """x (N, C, H, W), zero-padded, as a (C, N, H', W') view of contiguous (C, H', W', N) memory;
    no copy when x is already that memory and unpadded."""
    (ph, pw), (n, c, h, w) = padding, x.shape
    if not (ph or pw):
        return chwn(x).transpose(0, 3, 1, 2)
    xc = x.transpose(1, 0, 2, 3)
    xp = np.zeros((c, h + 2 * ph, w + 2 * pw, n), dtype=x.dtype).transpose(0, 3, 1, 2)
    xp[..., ph:ph + h, pw:pw + w] = xc
    return xp


def _tap_major(cols, c, n, out_hw):
    """The (C*kh*kw, OH*OW*N) columns as (kh*kw, C, N, OH, OW): one (C, N, OH, OW) view per tap,
    matching `taps` of the (C, N, H, W) input."""
    oh, ow = out_hw
    return cols.reshape(c, -1, oh, ow, n).transpose(1, 0, 4, 2, 3)


def conv2d_forward(x, weight, bias, stride, padding, ws=None):
    """x (N, C, H, W), weight (O, C, kh, kw), bias (O,) or None -> (y (N, O, OH, OW), cols).

    `cols` (C*kh*kw + 1, OH*OW*N) is what `conv2d_backward` needs; keep it until then (it lives in
    the Workspace `ws`, which the next call overwrites). Its last row is ones, so the bias rides
    along in the GEMM (and its gradient in the backward GEMM) instead of costing a pass over the
    output.
    """
    (sh, sw), (ph, pw) = stride, padding
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    oh, ow = out_size(h, kh, sh, ph), out_size(w, kw, sw, pw)
    k = c * kh * kw
    cols = (ws or Workspace()).empty("cols", (k + 1, oh * ow * n), x.dtype)
    for dst, src in zip(_tap_major(cols[:k], c, n, (oh, ow)),
                        taps(_chwn(x, padding), (kh, kw), stride, (oh, ow))):
        dst[...] = src
    cols[k] = 1
    w_b = np.empty((o, k + 1), dtype=weight.dtype)
    w_b[:, :k] = weight.reshape(o, k)
    w_b[:, k] = 0 if bias is None else bias
    y = w_b @ cols  # (O, OH*OW*N): one BLAS gemm
    return nchw(y.reshape(o, oh, ow, n)), cols


def conv2d_backward(grad_y, cols, weight, x_shape, stride, padding, input_grad=True, ws=None):
    """grad_y (N, O, OH, OW) -> (grad_x (N, C, H, W) or None unless `input_grad`,
    grad_weight like weight, grad_bias (O,)). `ws`: a Workspace for the scratch columns."""
    ph, pw = padding
    n, c, h, w = x_shape
    o, _, kh, kw = weight.shape
    oh, ow = grad_y.shape[2:]
    k = c * kh * kw
    gy = grad_y.transpose(1, 2, 3, 0).reshape(o, -1)  # a view when grad_y is (O, OH, OW, N) memory
    # (C*kh*kw + 1, O): the weight gradient, then the bias's from the ones row. A GEMM this
    # skinny (a long inner dimension, two short ones) runs faster in OpenBLAS with the longer
    # short side as the result's rows: ref-cnn's first layer (10 rows x 32 channels) takes
    # 1.25 ms that way instead of 1.66 ms; the other layers measured are already that way round.
    grads = cols @ gy.T if len(cols) >= o else (gy @ cols.T).T
    grad_w, grad_b = grads[:k].T.reshape(weight.shape), grads[k]
    if not input_grad:
        return None, grad_w, grad_b
    gcols = (ws or Workspace()).empty("grad_cols", (k, gy.shape[1]), gy.dtype)
    np.matmul(weight.reshape(o, k).T, gy, out=gcols)
    # Overlapping windows share input pixels; summing tap by tap (kh*kw strided adds, each over
    # the whole batch) is the scatter of col2im without np.add.at's per-element cost.
    gxp = np.zeros((c, h + 2 * ph, w + 2 * pw, n), dtype=gcols.dtype).transpose(0, 3, 1, 2)
    for dst, g in zip(taps(gxp, (kh, kw), stride, (oh, ow)), _tap_major(gcols, c, n, (oh, ow))):
        dst += g
    return gxp[..., ph:ph + h, pw:pw + w].transpose(1, 0, 2, 3), grad_w, grad_b


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


def maxpool2d_forward(x, kernel, stride, relu=False):
    """x (N, C, H, W) -> (y (N, C, OH, OW), first: kh*kw bool arrays (N, C, OH, OW)).

    first[k] marks the windows whose FIRST maximum in row-major window order is tap k, as
    PyTorch's argmax; ties are common (all-zero MNIST borders after ReLU) and must neither split
    nor duplicate the gradient. Every array keeps x's memory order. `relu`: ReLU after pooling
    (which equals pooling after ReLU), a window cut to zero passing no gradient back.
    """
    taps = pool_taps(x, kernel, stride)
    y = taps[0].copy(order="K")
    leads = []  # leads[k - 1]: tap k beats every earlier tap, strictly
    for v in taps[1:]:
        leads.append(v > y)
        np.maximum(y, v, out=y)
    # The first maximum is the tap that took the lead last: walk back from the end.
    first, later = [], np.zeros_like(y, dtype=bool)
    for m in reversed(leads):
        first.append(np.greater(m, later, out=m))  # for bools, m > later is "m and not later"
        later |= m
    first.append(~later)
    first.reverse()
    if relu:
        cut = y <= 0                        # NaN is not cut: it must reach the loss
        y[cut] = 0
        for m in first:
            m &= ~cut
    return y, first


def maxpool2d_backward(grad_y, first, x, kernel, stride):
    """grad_y (N, C, OH, OW) -> grad_x like x (N, C, H, W): each window's gradient on its first
    maximum. `x` is the forward input, for its shape and memory order."""
    (kh, kw), (sh, sw) = kernel, stride
    oh, ow = grad_y.shape[2:]
    overlapping = sh < kh or sw < kw
    # Windows that tile x exactly write every element once; otherwise some are never written
    # (a cropped border, or gaps when stride > kernel) or written twice (overlapping windows).
    tiled = (sh, sw) == (kh, kw) and x.shape[2:] == (oh * kh, ow * kw)
    grad_x = np.empty_like(x) if tiled else np.zeros_like(x)
    for v, m in zip(pool_taps(grad_x, kernel, stride), first):
        if overlapping:
            v += grad_y * m
        else:
            np.multiply(grad_y, m, out=v)
    return grad_x


def avgpool2d_forward(x, kernel, stride):
    """x (N, C, H, W) -> y (N, C, OH, OW), the mean of each window."""
    taps = pool_taps(x, kernel, stride)
    y = taps[0].copy(order="K")
    for v in taps[1:]:
        y += v
    y /= len(taps)
    return y


def avgpool2d_backward(grad_y, x, kernel, stride):
    """grad_y (N, C, OH, OW) -> grad_x like x (N, C, H, W): each window's gradient spread evenly.
    `x` is the forward input, for its shape and memory order."""
    g = grad_y / (kernel[0] * kernel[1])
    grad_x = np.zeros_like(x, dtype=g.dtype)
    for v in pool_taps(grad_x, kernel, stride):
        v += g
    return grad_x


# --- batch normalisation and global average pooling ---------------------------------------------
def batchnorm2d_forward(x, weight, bias, eps, running=None, relu=False, residual=None,
                        average=False):
    """x (N, C, H, W), weight and bias (C,) -> (y like x, (mean, var) (C,), ctx).

    Training (`running` None) normalises by the batch's per-channel mean and biased variance
    over (N, H, W), which come back for the running statistics; eval (`running` = (mean, var))
    by those. Then y = xhat * weight + bias, plus `residual` (like x) when given, then ReLU when
    `relu`, then with `average` global average pooling, y (N, C): the tail of a residual block,
    or of a network, in one operation. ctx is what batchnorm2d_backward takes.
    """
    if running is None:
        mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
    else:
        mean, var = running
    inv_std = (1 / np.sqrt(var + eps)).astype(x.dtype)
    xhat = (x - mean[:, None, None]) * inv_std[:, None, None]
    y = xhat * weight[:, None, None] + bias[:, None, None]
    if residual is not None:
        y += residual
    if relu:
        np.maximum(y, 0, out=y)
    ctx = (xhat, inv_std, y if relu else None, running is None, residual is not None, average)
    return (global_avgpool2d_forward(y) if average else y), (mean, var), ctx


def batchnorm2d_backward(grad_y, ctx, weight):
    """grad_y like the forward's output -> (grad_x, grad_weight (C,), grad_bias (C,),
    grad_residual or None when the forward added none)."""
    xhat, inv_std, y, batch_stats, added, average = ctx
    if average:
        grad_y = global_avgpool2d_backward(grad_y, xhat)
    g = grad_y * (y > 0) if y is not None else grad_y
    grad_w = (g * xhat).sum(axis=(0, 2, 3))
    grad_b = g.sum(axis=(0, 2, 3))
    gx = g * (weight * inv_std)[:, None, None]
    if batch_stats:
        # Batch statistics depend on every input: remove the gradient's mean and its projection
        # onto xhat, per channel.
        gx = gx - gx.mean(axis=(0, 2, 3), keepdims=True) - xhat * (
            (gx * xhat).mean(axis=(0, 2, 3), keepdims=True))
    return gx, grad_w, grad_b, (g if added else None)


def global_avgpool2d_forward(x):
    """x (N, C, H, W) -> y (N, C), each channel's mean over the image."""
    return x.mean(axis=(2, 3))


def global_avgpool2d_backward(grad_y, x):
    """grad_y (N, C) -> grad_x like `x` (the forward's input: its shape and memory order), the
    gradient spread evenly over each image."""
    grad_x = np.empty_like(x, dtype=grad_y.dtype)
    grad_x[...] = (grad_y / (grad_x.shape[2] * grad_x.shape[3]))[:, :, None, None]
    return grad_x


# --- activations and the loss -----------------------------------------------------------------
def relu_forward(x):
    """x (any shape) -> (y = max(x, 0), ctx for relu_backward: the mask x > 0)."""
    mask = x > 0
    return np.maximum(x, 0), mask


def relu_backward(grad_y, mask):
    return grad_y * mask


def cross_entropy(logits, labels):
    """logits (N, K), labels int64 (N,) in [0, K) -> (the summed loss as a float, its gradient
    (N, K): softmax minus one-hot). Rows are shifted by their maximum before exp, so exp never
    overflows, even for logits like 1e4."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    log_p = shifted - log_z
    rows = np.arange(len(labels))
    grad = np.exp(log_p)
    grad[rows, labels] -= 1
    # float64: long sums stay accurate
    return float(-log_p[rows, labels].sum(dtype=np.float64)), grad


# --- the optimizers' update rules (ddl/optim.py writes each out) ------------------------------
# Each updates `data` and its state in place from `grad`, all flat arrays of one size (one
# parameter, or a run of them lying end to end in a flat buffer); state that the hyperparameters
# leave unused arrives empty. Hyperparameters are Python floats.
def _decayed(data, grad, weight_decay):
    """The gradient with L2 weight decay folded in (PyTorch's coupled `weight_decay`)."""
    return grad + weight_decay * data if weight_decay else grad


def round_bf16(x, out):
    """out (uint16, like x) = float32 x rounded to bfloat16 (its upper 16 bits), to nearest with
    ties to even; NaN stays a NaN, and what rounds past bf16's largest value becomes inf."""
    u = x.view(np.uint32)
    out[...] = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    out[np.isnan(x)] = 0x7FC0


def sum_bf16(every, out):
    """out (float32, n) = every[0] + every[1] + ... in that order: the bfloat16 bits (R, n) of R
    ranks, widened exactly to float32 and summed."""
    out[...] = (every[0].astype(np.uint32) << 16).view(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):   # the step's finite check says it
        for row in every[1:]:
            out += (row.astype(np.uint32) << 16).view(np.float32)


def sgd(data, grad, buf, lr, momentum, dampening, weight_decay, nesterov, first):
    """torch.optim.SGD's step; buf is the momentum buffer (unused without momentum), `first`
    when it holds nothing yet."""
    g = _decayed(data, grad, weight_decay)
    if momentum:
        if first:
            buf[...] = g
        else:
            buf *= momentum
            buf += (1 - dampening) * g
        g = g + momentum * buf if nesterov else buf
    data -= lr * g


def adam(data, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step):
    """torch.optim.Adam's step number `step` (a float, from 1)."""
    g = _decayed(data, grad, weight_decay)
    exp_avg *= beta1
    exp_avg += (1 - beta1) * g
    exp_avg_sq *= beta2
    exp_avg_sq += (1 - beta2) * g * g
    denom = np.sqrt(exp_avg_sq) / math.sqrt(1 - beta2 ** step) + eps
    data -= (lr / (1 - beta1 ** step)) * exp_avg / denom


def rmsprop(data, grad, square_avg, grad_avg, buf, lr, alpha, eps, weight_decay, momentum,
            centered):
    """torch.optim.RMSprop's step; grad_avg is used only when centered, buf only with momentum."""
    g = _decayed(data, grad, weight_decay)
    square_avg *= alpha
    square_avg += (1 - alpha) * g * g
    if centered:
        grad_avg *= alpha
        grad_avg += (1 - alpha) * g
        # s >= a**2 in exact arithmetic; float32 rounding can dip below and give NaN.
        avg = np.sqrt(np.maximum(square_avg - grad_avg * grad_avg, 0)) + eps
    else:
        avg = np.sqrt(square_avg) + eps
    if momentum:
        buf *= momentum
        buf += g / avg
        data -= lr * buf
    else:
        data -= lr * (g / avg)


# --- arrays and the plan ----------------------------------------------------------------------
def empty(shape, dtype):
    """A new uninitialised C-ordered array where this backend's kernels run (main memory)."""
    return np.empty(shape, dtype)


def zeros(shape, dtype):
    """As `empty`, zeroed."""
    return np.zeros(shape, dtype)


def array(data, dtype):
    """A C-ordered copy of `data` (any array-like) as `dtype`, where this backend's kernels run."""
    return np.array(data, dtype=dtype, order="C")


def plan(layers):
    """The steps that run `layers` (a Sequential's modules, in order): the layers themselves, one
    by one; the reference fuses nothing."""
    return list(layers)


def slow_steps(module):
    """The layers of `module` that this backend runs without compiled kernels, by name: none
    counts here, the reference being chosen (`--kernels numpy`), not fallen back to."""
    return []

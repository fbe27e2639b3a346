"""Batch normalisation (with the residual add and the ReLU after it in the same pass) and global
average pooling.

Activations are (C, H, W, N) memory, seen here as (C, M) rows, M = H*W*N: a channel's values
are one unit-stride row, so every statistic is a sum along a row. Sums run in float64: a row
holds up to millions of values (a 28x28 image, batch 256: 200,704), whose float32 sum would lose
digits. The forward pass stores no normalised copy; backward recomputes xhat = (x - mean) * inv
from the input, one read instead of a write and a read.
"""
import numpy as np

from ddl.kernels.jit import helper, kernel

ROWS = "T[:, ::1]"


@helper
def row_moments(xs):
    """The mean and biased variance of the row xs, in float64 (two passes: no cancellation)."""
    m = xs.shape[0]
    s = 0.0
    for i in range(m):
        s += xs[i]
    mu = s / m
    q = 0.0
    for i in range(m):
        d = xs[i] - mu
        q += d * d
    return mu, q / m


@helper
def normalize_row(xs, a, b, rs, add, relu, store, ys, average, means):
    """ys = xs * a + b (+ rs if add), then ReLU if relu (NaN kept), if `store`; with `average`,
    means (N,) = the mean of those values over the row's pixels, xs being (pixels, N) memory.
    Without it the row is one "pixel" of all its values (the loops below then run as one)."""
    n = means.shape[0] if average else xs.shape[0]
    if average:
        means[:] = 0
    for p in range(xs.shape[0] // n):
        for k in range(n):
            i = p * n + k
            v = xs[i] * a + b + rs[i] if add else xs[i] * a + b
            v = 0 if relu and v <= 0 else v
            if store:
                ys[i] = v
            if average:
                means[k] += v
    if average:
        means /= xs.shape[0] // n


@kernel(f"({ROWS}, T[::1], T[::1], T, {ROWS}, boolean, boolean, boolean, T[::1], T[::1], "
        f"T[::1], T[::1], T[::1], boolean, {ROWS}, boolean, {ROWS})")
def batch_normalize(x, weight, bias, eps, residual, add, relu, batch_stats, mean, var, inv, scale,
                    shift, store, y, average, means):
    """y[c] = x[c] * scale[c] + shift[c] (+ residual[c] if add), then ReLU if relu (NaN kept),
    for inv[c] = 1 / sqrt(var[c] + eps), scale[c] = weight[c] * inv[c] and shift[c] = bias[c] -
    mean[c] * scale[c]; with `batch_stats` (training), mean[c] and var[c] are first set to the
    moments of row x[c] (summed in float64, stored as T), else (evaluation) they are given. One
    channel at a time: its row, read from memory once, is still in the cache for the second
    moment and the normalisation (the statistics of every channel first, then the
    normalisation, read x from memory twice). y is written if `store`; with `average` (global
    average pooling after it: x (C, H*W*N)), means (C, N) = y's mean over each image, where a
    pooling pass of its own would read y back, and without a residual never needs it stored."""
    one = x.dtype.type(1)
    for c in range(x.shape[0]):
        if batch_stats:
            mean[c], var[c] = row_moments(x[c])
        inv[c] = one / np.sqrt(var[c] + eps)
        scale[c] = weight[c] * inv[c]
        shift[c] = bias[c] - mean[c] * scale[c]
        normalize_row(x[c], scale[c], shift[c], residual[c] if add else x[c], add, relu, store,
                      y[c] if store else x[c], average, means[c] if average else x[c])


@kernel(f"({ROWS}, {ROWS}, T[::1], T[::1], T[::1], T[::1], {ROWS}, boolean, boolean, {ROWS}, "
        f"boolean, boolean, float64[::1], float64[::1], {ROWS})")
def normalize_grad(gy, x, mean, inv, scale, shift, y, relu, batch_stats, gres, add, average, gw,
                   gb, gx):
    """The gradients of a batch normalisation by mean and inv = 1/std (C,), whose output x *
    scale + shift (scale = weight * inv) passed a ReLU if relu, after the residual's add if
    `add` (the output y then read back for the ReLU's mask; without a residual the mask is
    recomputed from x, as the forward pass computed it, and y is not read: one pass over memory
    less): gx (C, M); gw, gb (C,) the weight's and bias's (float64, for the caller to cast);
    and, if `add`, gres = the gradient past the ReLU (the residual's). With `batch_stats` the
    mean and inv depend on x too: per channel, the gradient's mean and its projection onto
    xhat come off. With `average`, gy (C, N) is the gradient of the output's means over each
    image (x being (C, H*W*N)), spread here over the pixels instead of in memory."""
    m, one, zero = x.shape[1], x.dtype.type(1), x.dtype.type(0)
    n = gy.shape[1] if average else m       # as in normalize_row: one "pixel" unless average
    share = one / (m // n)
    for c in range(x.shape[0]):
        gys, xs, gxs = gy[c], x[c], gx[c]
        mu, s = mean[c], inv[c]
        # The ReLU kept v where v = seen * a + b > 0: the output itself if add, else x's value
        # normalised again (the same multiply-add, the same rounding).
        seen, a, b = (y[c], one, zero) if add else (xs, scale[c], shift[c])
        sg, sgx = 0.0, 0.0
        for p in range(m // n):
            for k in range(n):
                i = p * n + k
                g = gys[k] * share if average else gys[i]
                g = g if not relu or seen[i] * a + b > 0 else 0
                gxs[i] = g
                sg += g
                sgx += g * (xs[i] - mu) * s
        gw[c], gb[c] = sgx, sg
        if add:
            gr = gres[c]
            for i in range(m):
                gr[i] = gxs[i]
        kc = scale[c]
        if batch_stats:
            a, b = sg / m, sgx / m
            for i in range(m):
                gxs[i] = kc * (gxs[i] - a - (xs[i] - mu) * s * b)
        else:
            for i in range(m):
                gxs[i] = kc * gxs[i]


@kernel("(T[:, :, ::1], T[:, ::1])")
def mean_over_pixels(x, y):
    """y[c, n] = the mean of x[c, :, n]: x (C, H*W, N), y (C, N)."""
    p = x.shape[1]
    for c in range(x.shape[0]):
        ys = y[c]
        for n in range(x.shape[2]):
            ys[n] = 0
        for j in range(p):
            xs = x[c, j]
            for n in range(x.shape[2]):
                ys[n] += xs[n]
        for n in range(x.shape[2]):
            ys[n] /= p


@kernel("(T[:, ::1], T[:, :, ::1])")
def spread_over_pixels(g, gx):
    """gx[c, j, n] = g[c, n] / (H*W) for every pixel j: the adjoint of mean_over_pixels."""
    p = gx.shape[1]
    for c in range(gx.shape[0]):
        gs = g[c]
        for j in range(p):
            out = gx[c, j]
            for n in range(gx.shape[2]):
                out[n] = gs[n] / p

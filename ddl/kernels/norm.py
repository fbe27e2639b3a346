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
def normalize_row(xs, a, b, rs, add, relu, ys):
    """ys = xs * a + b (+ rs if add), then ReLU if relu (NaN kept)."""
    if add:
        for i in range(xs.shape[0]):
            v = xs[i] * a + b + rs[i]
            ys[i] = 0 if relu and v <= 0 else v
    else:
        for i in range(xs.shape[0]):
            v = xs[i] * a + b
            ys[i] = 0 if relu and v <= 0 else v


@kernel(f"({ROWS}, T[::1], T[::1], T, {ROWS}, boolean, boolean, T[::1], T[::1], T[::1], {ROWS})")
def batch_normalize(x, weight, bias, eps, residual, add, relu, mean, var, inv, y):
    """Training's pass: mean[c], var[c] = the moments of row x[c] (summed in float64, stored as
    T), inv[c] = 1 / sqrt(var[c] + eps), then y[c] as `normalize` gives it for scale weight[c] *
    inv[c] and shift bias[c] - mean[c] * scale. One channel at a time: its row, read from memory
    once, is still in the cache for the second moment and the normalisation (the statistics of
    every channel first, then the normalisation, read x from memory twice)."""
    one = x.dtype.type(1)
    for c in range(x.shape[0]):
        mean[c], var[c] = row_moments(x[c])
        inv[c] = one / np.sqrt(var[c] + eps)
        a = weight[c] * inv[c]
        normalize_row(x[c], a, bias[c] - mean[c] * a, residual[c] if add else x[c], add, relu,
                      y[c])


@kernel(f"({ROWS}, T[::1], T[::1], {ROWS}, boolean, boolean, {ROWS})")
def normalize(x, scale, shift, residual, add, relu, y):
    """y[c] = x[c] * scale[c] + shift[c] (+ residual[c] if add), then ReLU if relu (NaN kept):
    evaluation's pass, by the running statistics."""
    for c in range(x.shape[0]):
        normalize_row(x[c], scale[c], shift[c], residual[c] if add else x[c], add, relu, y[c])


@kernel(f"({ROWS}, {ROWS}, T[::1], T[::1], T[::1], {ROWS}, boolean, boolean, {ROWS}, boolean, "
        f"float64[::1], float64[::1], {ROWS})")
def normalize_grad(gy, x, mean, inv, k, y, relu, batch_stats, gres, add, gw, gb, gx):
    """The gradients of a batch normalisation by mean and inv = 1/std (C,), with k = weight *
    inv, whose output y passed a ReLU if relu: gx (C, M); gw, gb (C,) the weight's and bias's
    (float64, for the caller to cast); and, if `add`, gres = the gradient past the ReLU (the
    residual's). With `batch_stats` the mean and inv depend on x too: per channel, the
    gradient's mean and its projection onto xhat come off."""
    m = x.shape[1]
    for c in range(x.shape[0]):
        gys, xs, ys, gxs = gy[c], x[c], y[c], gx[c]
        mu, s = mean[c], inv[c]
        sg, sgx = 0.0, 0.0
        for i in range(m):
            g = gys[i] if not relu or ys[i] > 0 else 0
            gxs[i] = g
            sg += g
            sgx += g * (xs[i] - mu) * s
        gw[c], gb[c] = sgx, sg
        if add:
            gr = gres[c]
            for i in range(m):
                gr[i] = gxs[i]
        kc = k[c]
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

"""Direct convolution for stride-1 layers that Winograd does not take (few input channels, or
kernels other than 3x3): a network's first layer, seed-cnn's 5x5 layers, resnet-mini's first
stage.

Arrays are (C, H, W, N), the batch innermost, seen here with the last two axes merged,
(C, H, W*N): one output row of one channel, y[o, r] (OW*N values), is then a sum of shifted
input rows, y[o, r, m] = sum over c, i, j of w[o, c, i, j] * x[c, r + i, j*N + m], a long
unit-stride loop. The kernels are compiled per kernel size, which numba then treats as
constants: the kh*kw taps unroll inside that loop. Each input value loaded feeds the
accumulators of four output channels at once (OB), whose rows are loaded and stored once per
input channel. One output channel at a time, each load fed one multiply-add: 16 -> 16 channels
at 28x28, batch 64, took 10.9 ms forward and 25.6 backward to this kernel's 6.7 and 14.8 (one
run, interleaved, on a loaded 2-core Xeon, 2026-12-06). The layer pads
its output channels to a multiple of OB with zero weights and returns a view of the first O.
`pool=True` max-pools 2x2 (and applies ReLU) from two rows at a time, so the full-resolution
output is never stored.

Zero padding is never written out whole: as the output rows advance, the kernels copy each
input row once into a ring of kh + 1 rows that hold it between the padding's zero columns (small
enough to stay in the cache), and read a row of zeros for the rows above and below the input. A
padded copy of the input, written and read back from memory, cost a layer one more pass over its
input each way (docs/speed.md).

The backward pass: the input gradient is the forward kernel again, run over the output
gradient, zero-padded by kh - 1 - ph rows and kw - 1 - pw columns, with the kernels flipped and
their two channel axes swapped (a "full" correlation), unless the output is under half the
input's size (then one GEMM and gemm.py's adjoint of im2col); the weight gradient takes dot
products of gradient rows with shifted input rows, four output channels by up to three taps in
registers.
"""
import functools

import numpy as np

from ddl.kernels import arrays, gemm
from ddl.kernels.jit import X3, X4, helper, kernel
from ddl.kernels.pool import first_max4, spread4

# Kernel sizes compiled ahead by `warm` (others on first use): ref-cnn's and seed-cnn's.
COMMON = ((3, 3), (5, 5))
OB = 4      # output channels per block (the kernels below hold OB of them by name)
CHUNK = np.uint64(1024)     # values of a row per pass over the input channels


@helper
def slot(row, height, slots, padded):
    """Where the kernels below find row `row` of the zero-padded input: in x itself, unless
    `padded`; else in the ring (see `fill`) at row % slots, or at `slots`, a row of zeros
    never written, for a row above or below x. (One array read through an index: a choice
    between arrays in the inner loop kept numba from vectorising it.)"""
    if not padded:
        return row
    return row % slots if 0 <= row < height else slots


@helper
def fill(x, ring, rows_end, filled, left):
    """Copy x's rows filled + 1 .. rows_end - 1 (clipped to x) of every channel into `ring`
    (C, slots + 1, (W + 2 pw)*N), each between `left` zeros and as many on its right (never
    written: made zero), at row % slots; returns the last row now copied. A layer reads each
    input row once from memory this way, where padding x first wrote and read a copy."""
    last, slots = min(rows_end, x.shape[1]) - 1, ring.shape[1] - 1
    for row in range(filled + 1, last + 1):
        for c in range(x.shape[0]):
            src, dst = x[c, row], ring[c, row % slots, left:]
            for m in range(src.shape[0]):
                dst[m] = src[m]
    return max(filled, last)


@functools.lru_cache(maxsize=None)
def forward_kernel(kh, kw):
    """The forward kernel compiled for kh x kw kernels. It closes over those two ints and
    nothing else: numba's cache keys a closure by its contents, and a function among them would
    pickle differently in every process (no cache hit ever)."""

    @kernel(f"({X3}, {X4}, T[::1], int64, int64, int64, boolean, boolean, {X3}, "
            f"T[:, :, ::1], {X3}, uint8[:, :, ::1])")
    def conv(x, w, bias, n, ph, pw, pool, relu, ring, rows, y, code):
        """y (O, OH, OW*N) = the convolution of x (C, H, W*N), zero-padded by ph rows and pw
        columns, with w (O, C, kh, kw) plus bias, O a multiple of 4; ring (C, kh + 2, (W +
        2pw)*N), zero, is `fill`'s scratch when there is a padding; with `pool`, y and code (O,
        OH//2, (OW//2)*N) hold it max-pooled 2x2 (ReLU'd if relu) and each window's code (see
        pool.py), from two rows at a time of four channels in rows (4, 2, OW*N)."""
        # Unsigned offsets: numba checks signed indices for wrap-around, which kept LLVM from
        # proving `j * n + m` contiguous and made every load a gather.
        nu, width = np.uint64(n), np.uint64(rows.shape[2])
        filled, spread = -1, 2 if pool else 1
        # kh + 1 ring slots, a constant: the slot of a row, `row % slots`, then needs no
        # division, which LLVM cannot hoist out of the loop over m (it could divide by zero) and
        # which then kept that loop scalar: ten times slower.
        padded, height, slots = ph > 0 or pw > 0, x.shape[1], kh + 1
        src = ring if padded else x
        # Output rows outermost: the input rows that one output row reads (C x kh rows) can stay
        # in the L2 cache for every block of channels, where blocks outermost would stream all
        # of x once per block (no difference measurable under the load it was tried in).
        for out_row in range(y.shape[1]):
            if padded:
                filled = fill(x, ring, spread * out_row + spread - 1 - ph + kh, filled, pw * n)
            for o in range(0, y.shape[0], 4):
                for a in range(spread):
                    r = 2 * out_row + a if pool else out_row
                    y0 = rows[0, a] if pool else y[o, r]
                    y1 = rows[1, a] if pool else y[o + 1, r]
                    y2 = rows[2, a] if pool else y[o + 2, r]
                    y3 = rows[3, a] if pool else y[o + 3, r]
                    y0[:], y1[:], y2[:], y3[:] = bias[o], bias[o + 1], bias[o + 2], bias[o + 3]
                    # A chunk of the rows at a time, four output rows and three input rows of
                    # it in the L1 cache (28 KB; whole rows of 28 pixels x 64 images, 51 KB,
                    # overflowed a 48 KB L1). A chunk of 512 values took 5-10% longer: each
                    # pass over the input channels sets its loop up again.
                    for m0 in range(0, width, CHUNK):
                        for c in range(x.shape[0]):
                            for m in range(m0, min(m0 + CHUNK, width)):
                                t0, t1, t2, t3 = y0[m], y1[m], y2[m], y3[m]
                                for i in range(kh):
                                    xs = src[c, slot(r + i - ph, height, slots, padded)]
                                    for j in range(kw):
                                        v = xs[np.uint64(j) * nu + m]
                                        t0 += w[o, c, i, j] * v
                                        t1 += w[o + 1, c, i, j] * v
                                        t2 += w[o + 2, c, i, j] * v
                                        t3 += w[o + 3, c, i, j] * v
                                y0[m], y1[m], y2[m], y3[m] = t0, t1, t2, t3
                if pool:
                    for b in range(4):
                        for pc in range(y.shape[2] // n):
                            top, bottom = rows[b, 0, 2 * pc * n:], rows[b, 1, 2 * pc * n:]
                            ys, codes = y[o + b, out_row, pc * n:], code[o + b, out_row, pc * n:]
                            for k in range(n):
                                ys[k], codes[k] = first_max4(top[k], top[n + k], bottom[k],
                                                             bottom[n + k], relu)

    return conv


@helper
def add_taps(g0, g1, g2, g3, xs0, xs1, xs2, width, taps, grad_w, o, c, i, j0):
    """grad_w[o + b, c, i, j0 + t] += the dot product of gradient row g<b> with input row xs<t>
    (`width` values), for four channels b by up to three taps t < taps. The twelve sums stay in
    registers: each gradient and input value loaded feeds three or four multiply-adds."""
    zero = xs0.dtype.type(0)
    a00 = a01 = a02 = a10 = a11 = a12 = a20 = a21 = a22 = a30 = a31 = a32 = zero
    for m in range(width):
        h0, h1, h2, h3 = g0[m], g1[m], g2[m], g3[m]
        v = xs0[m]
        a00 += h0 * v
        a10 += h1 * v
        a20 += h2 * v
        a30 += h3 * v
        # Taps past the kernel's width (constant conditions in a kernel compiled per kernel
        # size, once its tap loop unrolls): adding h * 0 would still cost the FMAs.
        if taps > 1:
            v = xs1[m]
            a01 += h0 * v
            a11 += h1 * v
            a21 += h2 * v
            a31 += h3 * v
        if taps > 2:
            v = xs2[m]
            a02 += h0 * v
            a12 += h1 * v
            a22 += h2 * v
            a32 += h3 * v
    for t, (s0, s1, s2, s3) in enumerate(((a00, a10, a20, a30), (a01, a11, a21, a31),
                                          (a02, a12, a22, a32))):
        if t < taps:
            grad_w[o, c, i, j0 + t] += s0
            grad_w[o + 1, c, i, j0 + t] += s1
            grad_w[o + 2, c, i, j0 + t] += s2
            grad_w[o + 3, c, i, j0 + t] += s3


@functools.lru_cache(maxsize=None)
def weight_grad_kernel(kh, kw):
    """The weight-gradient kernel compiled for kh x kw kernels (closing over two ints only)."""

    @kernel(f"({X3}, {X3}, int64, int64, int64, {X3}, {X3}, uint8[:, :, ::1], boolean, "
            f"T[:, :, ::1], {X4}, T[::1])")
    def conv_weight_grad(x, g, n, ph, pw, ring, gy, code, pool, rows, grad_w, grad_b):
        """grad_w (O', C, kh, kw) += the weight gradient and grad_b (O',) += the bias gradient,
        from x (C, H, W*N), zero-padded by ph rows and pw columns (ring as in forward_kernel),
        and the output gradient g (O', OH, OW*N), O' a multiple of 4. With `pool`, g is unused:
        the gradient rows come from the pooled gradient gy and code (O, OH//2, (OW//2)*N), two
        rows of every channel at a time, spread into rows (O', 2, OW*N) (a full-resolution copy
        of the gradient, written and read back, cost a first layer a third of its backward
        pass)."""
        nu = np.uint64(n)
        oh = x.shape[1] + 2 * ph - kh + 1
        width = np.uint64(x.shape[2] + (2 * pw - kw + 1) * n)
        filled, padded, height, slots = -1, ph > 0 or pw > 0, x.shape[1], kh + 1   # see conv
        src = ring if padded else x
        if pool:
            rows[:, :, :] = 0           # the rows and columns that no pooling window reads
        for r in range(oh):
            if padded:
                filled = fill(x, ring, r - ph + kh, filled, pw * n)
            if pool and r % 2 == 0 and r // 2 < gy.shape[1]:
                for o in range(gy.shape[0]):
                    for pc in range(gy.shape[2] // n):
                        top, bottom = rows[o, 0, 2 * pc * n:], rows[o, 1, 2 * pc * n:]
                        gys, codes = gy[o, r // 2, pc * n:], code[o, r // 2, pc * n:]
                        for k in range(n):
                            top[k], top[n + k], bottom[k], bottom[n + k] = spread4(gys[k],
                                                                                   codes[k])
            elif pool and r % 2 == 0:   # an odd last row, which the pool drops
                rows[:, :, :] = 0
            for o in range(0, grad_w.shape[0], 4):
                if pool:
                    g0, g1, g2, g3 = (rows[o, r % 2], rows[o + 1, r % 2], rows[o + 2, r % 2],
                                      rows[o + 3, r % 2])
                else:
                    g0, g1, g2, g3 = g[o, r], g[o + 1, r], g[o + 2, r], g[o + 3, r]
                for b, gb in enumerate((g0, g1, g2, g3)):
                    grad_b[o + b] += gb[:width].sum()
                for c in range(x.shape[0]):
                    for i in range(kh):
                        xs = src[c, slot(r + i - ph, height, slots, padded)]
                        for j0 in range(0, kw, 3):
                            at = np.uint64(j0) * nu
                            add_taps(g0, g1, g2, g3, xs[at:], xs[at + nu:],
                                     xs[at + np.uint64(2) * nu:], width, kw - j0, grad_w, o, c,
                                     i, j0)

    return conv_weight_grad


@kernel(f"({X4}, uint8[:, :, :, ::1], {X4})")
def unpool(gy, code, g):
    """g[o, 2r + a, 2q + b] = the gradient that the pooled gy[o, r, q] sends to position (a, b)
    of its 2x2 window (all of it to the first maximum, see pool.spread4)."""
    for o in range(gy.shape[0]):
        for r in range(gy.shape[1]):
            for q in range(gy.shape[2]):
                top, bottom = g[o, 2 * r, 2 * q:], g[o, 2 * r + 1, 2 * q:]
                for k in range(gy.shape[3]):
                    top[0, k], top[1, k], bottom[0, k], bottom[1, k] = spread4(gy[o, r, q, k],
                                                                               code[o, r, q, k])


for _shape in COMMON:                  # registers them with `warm`
    forward_kernel(*_shape)
    weight_grad_kernel(*_shape)


def blocks(count):
    """count rounded up to a multiple of OB."""
    return -(-count // OB) * OB


def padded(a, count):
    """a with its first axis zero-padded to `count` entries (a itself if it has them)."""
    if len(a) == count:
        return a
    out = np.zeros((count, *a.shape[1:]), a.dtype)
    out[:len(a)] = a
    return out


def _ring(x, kh, padding, ws, name):
    """The kernels' ring (see forward_kernel) for x (C, H, W, N) padded by `padding`."""
    (c, _, w, n), (ph, pw) = x.shape, padding
    shape = (c, kh + 2, (w + 2 * pw) * n) if ph or pw else (1, 1, 1)
    return ws.zeros(f"{name} ring", shape, x.dtype)


def _convolve(x, weight, bias, padding, pool, relu, ws, scratch="rows"):
    """The forward kernel on x (C, H, W, N) zero-padded by `padding`: y (O', ...) and code for
    O' = O rounded up to a multiple of OB channels, the last zero."""
    o, kh, kw, n = len(weight), *weight.shape[2:], x.shape[3]
    (ph, pw), op = padding, blocks(o)
    oh, ow = x.shape[1] + 2 * ph - kh + 1, x.shape[2] + 2 * pw - kw + 1
    rows = ws.empty(scratch, (OB, 2, ow * n), x.dtype)
    y_hw = (oh // 2, ow // 2) if pool else (oh, ow)
    y = arrays.empty((op, *y_hw, n), x.dtype)
    code = arrays.empty(y.shape, np.uint8) if pool else np.empty((1, 1, 1, 1), np.uint8)
    forward_kernel(kh, kw)(x.reshape(*x.shape[:2], -1), padded(weight, op), padded(bias, op),
                           n, ph, pw, pool, relu, _ring(x, kh, padding, ws, scratch),
                           rows, y.reshape(op, y_hw[0], -1), code.reshape(*code.shape[:2], -1))
    return y, code


def forward(x, weight, bias, padding, pool, relu, ws):
    """x (C, H, W, N) -> (y, ctx) as winograd.forward, for any kernel size and a padding below
    it (`fits`). The kernels read x's rows between zeros as they go: no padded copy is made."""
    o = len(weight)
    y, code = _convolve(x, weight, bias, padding, pool, relu, ws)
    return y[:o], (x, code[:o] if pool else None, padding, x.shape)


def fits(weight_shape, padding):
    """Whether the direct kernels take this layer: a padding of at most the kernel's size less
    one (more would leave outputs that see no input, and a negative padding in backward)."""
    return all(p < k for p, k in zip(padding, weight_shape[2:]))


def backward(gy, ctx, weight, grad_w, grad_b, input_grad, ws):
    """As winograd.backward, but the input gradient comes back unpadded (C, H, W, N)."""
    x, code, (ph, pw), x_shape = ctx
    (o, c, kh, kw), n = weight.shape, x.shape[3]
    op = blocks(o)
    oh, ow = x.shape[1] + 2 * ph - kh + 1, x.shape[2] + 2 * pw - kw + 1
    # The full correlation below runs the kernel over every input pixel, zeros around the output
    # gradient included: when the output is much smaller than the input (seed-cnn's 5x5 layer on
    # 12x12 images: 8x8), most of that is multiplying zeros, and one GEMM on the gradient's panel
    # (gemm.py's adjoint of im2col) does less.
    full = input_grad and 2 * oh * ow >= x_shape[1] * x_shape[2]
    # Without the input gradient, the kernel spreads the pooled gradient itself.
    pooled = code is not None and not input_grad
    if pooled or (code is None and op == o):
        g = gy
    else:       # the full-resolution output gradient with O' channels, the last O' - O zero
        g = ws.zeros("grad_full", (op, oh, ow, n), gy.dtype)
        if code is None:
            g[:o] = gy
        else:
            unpool(gy, code, g)
    gw = grad_w if op == o else np.zeros((op, *grad_w.shape[1:]), grad_w.dtype)
    gb = grad_b if op == o else np.zeros(op, grad_b.dtype)
    rows = ws.empty("pool_rows", (op, 2, ow * n) if pooled else (1, 1, 1), gy.dtype)
    gy3 = gy.reshape(*gy.shape[:2], -1)
    code3 = code.reshape(gy3.shape) if pooled else np.empty((1, 1, 1), np.uint8)
    weight_grad_kernel(kh, kw)(x.reshape(c, x.shape[1], -1), g.reshape(*g.shape[:2], -1), n,
                               ph, pw, _ring(x, kh, (ph, pw), ws, "x"), gy3, code3, pooled,
                               rows, gw, gb)
    if op != o:
        grad_w += gw[:o]
        grad_b += gb[:o]
    if not input_grad:
        return None
    if not full:
        panel = ws.empty("panel_grad", (c * kh * kw, oh * ow * n), gy.dtype)
        np.matmul(weight.reshape(o, -1).T, g[:o].reshape(o, -1), out=panel)
        gx = arrays.zeros(x_shape, gy.dtype)
        gemm.unpack_add(panel.reshape(-1, oh, ow, n), kh, kw, 1, 1, ph, pw, gx)
        return gx
    # gx[c, v] = sum over o, i, j of w[o, c, i, j] g[o, v + kh-1 - i], g zero-padded by kh-1-ph
    # rows and kw-1-pw columns (a "full" correlation): the forward kernel with the taps
    # reversed, the channel axes swapped and the O' - O zero channels of g given zeros.
    flipped = np.zeros((c, op, kh, kw), weight.dtype)
    flipped[:, :o] = weight[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)
    gx, _ = _convolve(g, flipped, np.zeros(c, gy.dtype), (kh - 1 - ph, kw - 1 - pw), False,
                      False, ws, "grad_rows")
    return gx[:c]

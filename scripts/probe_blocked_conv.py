"""Probe for issue 16: a convolution's forward pass and weight gradient with the channels blocked
by a vector's width and a block of sums held in vector registers (oneDNN's layout), as kernels
with real source (cached by numba like ddl's), against ddl's direct and strided kernels.

LLVM vectorises innermost loops only, so a plain numba loop cannot hold sums in registers across
a loop that runs over input channels and taps. A value of the type `Vector` below is LLVM's
<LANES x float>: `zero`, `load` and `store` make and move one, `fma(s, v, acc)` is acc + s * v
with the scalar s broadcast, `get` reads a scalar without numba's check of a negative index;
float32 only.
LANES is 16 where the kernels compile for AVX-512 (32 registers) and 8 elsewhere (AVX2's 16).

- `pack`: x (C, H, W, N), ddl's layout, into xp (C/L, H + 2ph, W', N, L), zero-padded, L =
  LANES channels innermost (W' covers the weight gradient's columns, see `weight_tiles`).
- `tiles`, the forward pass: a tile of P = 6 output pixels x 2L output channels in 12 registers
  through the whole sum over input channels and taps; per input channel and tap, two vectors of
  weights (packed (O'/2L, C/L, kh, kw, L, 2L)) and 6 broadcasts of input values feed 12
  multiply-adds (2 weights and a broadcast more: 15 of AVX2's 16 registers). Pixels run in (OH,
  OW, N) order, each window found at `offsets[p]`, so a tile may span rows and images, and a
  stride only changes the offsets. `unpack` turns its (pixels, O') into (O, OH, OW, N).
- `weight_tiles`, the weight gradient: 4 output channels x 3 taps of a row in 12 registers, each
  a vector of L input channels of xp times a broadcast of the output gradient, read in ddl's own
  (O, OH, OW, N) layout; CHUNK pixels at a time, whose input stays in the cache.

Not used by ddl's training: docs/speed.md (issue 16, seventh round) has what it measured, and why
this stayed a probe. Run: python scripts/probe_blocked_conv.py; held to AVX2 (8 lanes):
NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES= python scripts/probe_blocked_conv.py
"""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numba  # noqa: E402
import numpy as np  # noqa: E402
from llvmlite import ir  # noqa: E402
from numba.core import types  # noqa: E402
from numba.extending import intrinsic, models, register_model  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from ddl import kernels  # noqa: E402
from ddl.kernels import arrays, direct, jit, strided  # noqa: E402
from ddl.kernels.arrays import out_size  # noqa: E402
from ddl.kernels.tune import cpu_key  # noqa: E402

LANES = 16 if jit.wide_vectors() else 8
P = 6
CHUNK = 512     # output pixels that the weight gradient sums at a time (weight_tiles)
compiled = numba.njit(fastmath=jit.FASTMATH, error_model="numpy", boundscheck=False, cache=True)


VECTOR = ir.VectorType(ir.FloatType(), LANES)


class Vector(types.Type):
    """LANES float32 values in one register."""

    def __init__(self):
        super().__init__(name=f"float32x{LANES}")


vector = Vector()
register_model(Vector)(lambda dmm, fe_type: models.PrimitiveModel(dmm, fe_type, VECTOR))


def _floats(a):
    return isinstance(a, types.Array) and a.dtype == types.float32


def _pointer(context, builder, array_type, array, index, to=VECTOR):
    """The address of element `index` of the (C-contiguous) array, as a pointer to `to`."""
    data = context.make_array(array_type)(context, builder, array).data
    return builder.bitcast(builder.gep(data, [index]), to.as_pointer())


@intrinsic
def load(typingctx, a, i):
    """a[i:i + LANES] (a C-contiguous float32 array, seen flat) as one vector."""
    if _floats(a) and isinstance(i, types.Integer):
        def codegen(context, builder, sig, args):
            return builder.load(_pointer(context, builder, sig.args[0], *args), align=4)
        return vector(a, i), codegen


@intrinsic
def store(typingctx, a, i, v):
    """a[i:i + LANES] = v (a C-contiguous float32 array, seen flat)."""
    if _floats(a) and v == vector:
        def codegen(context, builder, sig, args):
            builder.store(args[2], _pointer(context, builder, sig.args[0], args[0], args[1]),
                          align=4)
            return context.get_dummy_value()
        return types.none(a, i, v), codegen


@intrinsic
def get(typingctx, a, i):
    """a's element i (a C-contiguous float32 array, seen flat), i never negative."""
    if _floats(a) and isinstance(i, types.Integer):
        def codegen(context, builder, sig, args):
            return builder.load(_pointer(context, builder, sig.args[0], *args,
                                         to=ir.FloatType()))
        return types.float32(a, i), codegen


@intrinsic
def zero(typingctx):
    """A vector of zeros."""
    def codegen(context, builder, sig, args):
        return ir.Constant(VECTOR, [0.0] * LANES)
    return vector(), codegen


@intrinsic
def fma(typingctx, s, v, acc):
    """acc + s * v: the scalar s (as float32) times each lane of v."""
    if v == vector and acc == vector and isinstance(s, types.Float):
        def codegen(context, builder, sig, args):
            scalar = context.cast(builder, args[0], sig.args[0], types.float32)
            one = builder.insert_element(ir.Constant(VECTOR, ir.Undefined), scalar,
                                         ir.Constant(ir.IntType(32), 0))
            splat = builder.shuffle_vector(one, ir.Constant(VECTOR, ir.Undefined),
                                           ir.Constant(ir.VectorType(ir.IntType(32), LANES),
                                                       [0] * LANES))
            product = builder.fmul(splat, args[1], flags=["fast"])
            return builder.fadd(product, args[2], flags=["fast"])
        return vector(s, v, acc), codegen


@compiled
def tiles(xp, w, offsets, blocks, kh, kw, block_step, row_step, col_step, y):
    """y (pixels, O') = for each output pixel p and output channel o, the sum over input channels
    c and taps (i, j) of w's weight (o, c, i, j) times xp[offsets[p] + (c // L) block_step +
    i row_step + j col_step + c % L]; xp and w flat, w as the docstring at the top lays it out. At
    least P pixels."""
    pixels, width = offsets.shape[0], 2 * LANES
    taps = kh * kw * LANES * width
    for ob in range(y.shape[1] // width):
        for t in range((pixels + P - 1) // P):
            q = min(t * P, pixels - P)
            o0, o1, o2 = offsets[q], offsets[q + 1], offsets[q + 2]
            o3, o4, o5 = offsets[q + 3], offsets[q + 4], offsets[q + 5]
            a0 = a1 = a2 = a3 = a4 = a5 = b0 = b1 = b2 = b3 = b4 = b5 = zero()
            for cb in range(blocks):
                for i in range(kh):
                    for j in range(kw):
                        tap = (ob * blocks + cb) * taps + (i * kw + j) * LANES * width
                        at = cb * block_step + i * row_step + j * col_step
                        for c in range(LANES):
                            u = load(w, tap + c * width)
                            v = load(w, tap + c * width + LANES)
                            a0, b0 = fma2(get(xp, o0 + at + c), u, v, a0, b0)
                            a1, b1 = fma2(get(xp, o1 + at + c), u, v, a1, b1)
                            a2, b2 = fma2(get(xp, o2 + at + c), u, v, a2, b2)
                            a3, b3 = fma2(get(xp, o3 + at + c), u, v, a3, b3)
                            a4, b4 = fma2(get(xp, o4 + at + c), u, v, a4, b4)
                            a5, b5 = fma2(get(xp, o5 + at + c), u, v, a5, b5)
            col = ob * width
            for p, (a, b) in enumerate(((a0, b0), (a1, b1), (a2, b2), (a3, b3), (a4, b4),
                                        (a5, b5))):
                store(y[q + p], col, a)
                store(y[q + p], col + LANES, b)


@compiled
def weight_tiles(xp, gy, offsets, blocks, kh, kw, block_step, row_step, col_step, gw, gb):
    """gw (O'', kh, kw', C') = for each output channel o, tap (i, j) and input channel c, the sum
    over output pixels p of gy[o, p] times xp[offsets[p] + (c // L) block_step + i row_step +
    j col_step + c % L]: the weight gradient, with O'' = O rounded up to 4, kw' = kw rounded up
    to 3 (xp must hold the columns that the taps past kw read) and C' = C/L blocks; gw flat,
    zeroed by the caller. The sums of 4 output channels x 3 taps of a row, each a vector of L
    input channels, stay in registers through CHUNK pixels. gb (O,) += the sums of gy's rows."""
    o_all, pixels = gy.shape
    wide, row = -(-kw // 3) * 3, blocks * LANES
    step = kh * wide * row      # in gw, from one output channel to the next
    for o in range(o_all):      # the bias's gradient
        total, g = gb[o], gy[o]
        for p in range(pixels):
            total += g[p]
        gb[o] = total
    # A chunk of pixels at a time, their sums added into gw: the input they read (3 rows of
    # CHUNK/N + 2 pixels of N images, per block of channels) stays in the cache for every block
    # of outputs and tap, where the whole of a large input streamed from memory for each.
    for start in range(0, pixels, CHUNK):
        end = min(start + CHUNK, pixels)
        for cb in range(blocks):
            for o in range(0, o_all, 4):
                # rows past O: the last again, their sums dropped by the caller
                g0, g1 = gy[o], gy[min(o + 1, o_all - 1)]
                g2, g3 = gy[min(o + 2, o_all - 1)], gy[min(o + 3, o_all - 1)]
                for i in range(kh):
                    for j in range(0, kw, 3):
                        at = cb * block_step + i * row_step + j * col_step
                        to = ((o * kh + i) * wide + j) * row + cb * LANES
                        a0, a1, a2 = load3(gw, to, row)
                        b0, b1, b2 = load3(gw, to + step, row)
                        c0, c1, c2 = load3(gw, to + 2 * step, row)
                        d0, d1, d2 = load3(gw, to + 3 * step, row)
                        for p in range(start, end):
                            x0, x1, x2 = load3(xp, offsets[p] + at, col_step)
                            s = g0[p]
                            a0, a1, a2 = fma(s, x0, a0), fma(s, x1, a1), fma(s, x2, a2)
                            s = g1[p]
                            b0, b1, b2 = fma(s, x0, b0), fma(s, x1, b1), fma(s, x2, b2)
                            s = g2[p]
                            c0, c1, c2 = fma(s, x0, c0), fma(s, x1, c1), fma(s, x2, c2)
                            s = g3[p]
                            d0, d1, d2 = fma(s, x0, d0), fma(s, x1, d1), fma(s, x2, d2)
                        store3(gw, to, row, a0, a1, a2)
                        store3(gw, to + step, row, b0, b1, b2)
                        store3(gw, to + 2 * step, row, c0, c1, c2)
                        store3(gw, to + 3 * step, row, d0, d1, d2)


@numba.njit(inline="always")
def fma2(s, u, v, a, b):
    """(a + s u, b + s v): one broadcast of s for two vectors of sums."""
    return fma(s, u, a), fma(s, v, b)


@numba.njit(inline="always")
def load3(a, at, step):
    """The vectors at a[at], a[at + step] and a[at + 2 step]."""
    return load(a, at), load(a, at + step), load(a, at + 2 * step)


@numba.njit(inline="always")
def store3(a, at, step, v0, v1, v2):
    """a[at], a[at + step] and a[at + 2 step] = the three vectors."""
    store(a, at, v0)
    store(a, at + step, v1)
    store(a, at + 2 * step, v2)


@compiled
def pack(x, ph, pw, xp):
    """xp[c // L, ph + r, pw + q, m, c % L] = x[c, r, q, m]: x (C, H, W, N) into xp (C/L, H +
    2ph, W', N, L), W' >= W + 2pw, whose padding, columns past it and channels past C are left
    as they are (zero)."""
    c_all, h, w, n = x.shape
    for cb in range(xp.shape[0]):
        for r in range(h):
            for q in range(w):
                dst = xp[cb, ph + r, pw + q]
                for c in range(min(LANES, c_all - cb * LANES)):
                    src = x[cb * LANES + c, r, q]
                    for m in range(n):
                        dst[m, c] = src[m]


@compiled
def unpack(y, bias, out):
    """out[o, p] = y[p, o] + bias[o]: y (pixels, O') into out (O, pixels), a block of pixels at a
    time (read from the cache O times)."""
    pixels, step = y.shape[0], 64
    for p0 in range(0, pixels, step):
        for o in range(out.shape[0]):
            dst, b = out[o], bias[o]
            for p in range(p0, min(p0 + step, pixels)):
                dst[p] = y[p, o] + b


def _offsets(n, oh, ow, stride, wp):
    """The index in xp (C/L, HP, wp, N, L) of each output pixel's window, pixels in (OH, OW, N)
    order, (O, OH, OW, N) memory's."""
    col = n * LANES
    return (np.arange(oh)[:, None, None] * (stride[0] * wp * col)
            + np.arange(ow)[:, None] * (stride[1] * col) + np.arange(n) * LANES).reshape(-1)


def pack_input(x, kw, stride, padding, out_hw, ws):
    """x (C, H, W, N) packed into xp (C/L, H + 2ph, WP, N, L) in the Workspace `ws`, WP = W +
    2pw, or more: the columns that the weight gradient's taps past kw read (`weight_tiles`)."""
    (_, h, w, n), (ph, pw) = x.shape, padding
    wp = max(w + 2 * pw, (out_hw[1] - 1) * stride[1] + -(-kw // 3) * 3)
    xp = ws.zeros("blocked input", (-(-x.shape[0] // LANES), h + 2 * ph, wp, n, LANES), x.dtype)
    pack(x, ph, pw, xp)
    return xp


def _steps(xp):
    """The distances in xp (C/L, HP, WP, N, L) from one block of channels to the next, one row to
    the next and one column to the next."""
    _, hp, wp, n, _ = xp.shape
    return hp * wp * n * LANES, wp * n * LANES, n * LANES


def forward(x, weight, bias, stride, padding, out_hw, ws):
    """y (O, OH, OW, N) of x (C, H, W, N), weight (O, C, kh, kw) and bias (O,) or None, and xp
    (in the Workspace `ws`) for `weight_grad`."""
    (o, c, kh, kw), n, (oh, ow), width = weight.shape, x.shape[3], out_hw, 2 * LANES
    xp = pack_input(x, kw, stride, padding, out_hw, ws)
    blocks = len(xp)
    offsets = _offsets(n, oh, ow, stride, xp.shape[2])
    pixels = len(offsets)
    if pixels < P:          # a tile's pixels beyond the output: the last one again
        offsets = np.concatenate([offsets, np.repeat(offsets[-1:], P - pixels)])
    wb = np.zeros((-(-o // width) * width, blocks * LANES, kh, kw), x.dtype)
    wb[:o, :c] = weight
    wb = np.ascontiguousarray(wb.reshape(-1, width, blocks, LANES, kh, kw)
                              .transpose(0, 2, 4, 5, 3, 1))
    y = ws.empty("blocked output", (len(offsets), wb.shape[0] * width), x.dtype)
    tiles(xp.reshape(-1), wb.reshape(-1), offsets, blocks, kh, kw, *_steps(xp), y)
    out = arrays.empty((o, oh, ow, n), x.dtype)
    unpack(y[:pixels], np.zeros(o, x.dtype) if bias is None else bias.astype(x.dtype, copy=False),
           out.reshape(o, -1))
    return out, xp


def weight_grad(xp, gy, weight, stride):
    """(grad w (O, C, kh, kw), grad b (O,)) from gy (O, OH, OW, N) and `forward`'s xp."""
    (o, c, kh, kw), n = weight.shape, gy.shape[3]
    gw = np.zeros((-(-o // 4) * 4, kh, -(-kw // 3) * 3, len(xp) * LANES), gy.dtype)
    gb = np.zeros(o, gy.dtype)
    weight_tiles(xp.reshape(-1), gy.reshape(o, -1), _offsets(n, *gy.shape[1:3], stride,
                                                             xp.shape[2]),
                 len(xp), kh, kw, *_steps(xp), gw.reshape(-1), gb)
    return gw[:o, :, :kw, :c].transpose(0, 3, 1, 2), gb


def median_ms(fn, repeats=11):
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return float(np.median(times)) * 1e3


def probe(c, o, hw, s, n=64, rounds=3):
    """{what: [ms per round]} for one 3x3 layer (padding 1, stride s), batch n, and the largest
    difference of the blocked kernels' output and weight gradient from ddl's own, relative to
    the largest value: ddl's own is direct.py's for stride 1, strided.py's for stride 2."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((c, hw, hw, n), dtype=np.float32)           # ddl's (C, H, W, N)
    weight = rng.standard_normal((o, c, 3, 3), dtype=np.float32)
    bias = np.zeros(o, np.float32)
    oh = out_size(hw, 3, s, 1)
    mine, theirs = arrays.Workspace(), arrays.Workspace()
    if s == 1:
        def ddl_forward():
            return direct.forward(x, weight, bias, (1, 1), False, False, theirs)
        ddl_backward = direct.backward
    else:
        def ddl_forward():
            return strided.forward(x, weight, bias, (s, s), (1, 1), (oh, oh), theirs)
        ddl_backward = strided.backward
    ref, ctx = ddl_forward()
    gy = rng.standard_normal(ref.shape, dtype=np.float32)
    ref_gw = np.zeros_like(weight)
    ddl_backward(gy, ctx, weight, ref_gw, np.zeros(o, np.float32), False, theirs)
    y, xp = forward(x, weight, bias, (s, s), (1, 1), (oh, oh), mine)
    gw, _ = weight_grad(xp, gy, weight, (s, s))
    error = max(float(np.abs(a - b).max() / np.abs(b).max()) for a, b in ((y, ref), (gw, ref_gw)))
    out = np.empty((o, oh * oh * n), np.float32)
    ys = np.zeros((oh * oh * n, -(-o // (2 * LANES)) * 2 * LANES), np.float32)   # as tiles'
    contestants = {
        "forward": lambda: forward(x, weight, bias, (s, s), (1, 1), (oh, oh), mine),
        "ddl forward": ddl_forward,
        "weight grad": lambda: (pack(x, 1, 1, xp), weight_grad(xp, gy, weight, (s, s))),
        "ddl weight grad": lambda: ddl_backward(gy, ctx, weight, np.zeros_like(weight),
                                                np.zeros(o, np.float32), False, theirs),
        "pack": lambda: pack(x, 1, 1, xp),
        "unpack": lambda: unpack(ys, bias, out)}
    times = {name: [] for name in contestants}
    for _ in range(rounds):
        for name, fn in contestants.items():
            times[name].append(median_ms(fn))
    return times, 2 * o * c * 9 * oh * oh * n / 1e6, error


def main():
    threadpool_limits(1)
    kernels.get("numba")        # ddl's LLVM options and CPU name, for its kernels and these
    print(f"{cpu_key().split(' flags:')[0]}, numba compiling for {kernels.target()}, {LANES} "
          "lanes, batch 64, one thread; ms, medians of 11 calls, per round (3 rounds)\n")
    print("| layer | forward: blocked (its pack, unpack) | ddl | weight gradient: blocked "
          "(with its pack) | ddl | difference |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for c, o, hw, s in [(16, 16, 28, 1), (32, 32, 14, 1), (64, 64, 7, 1), (16, 32, 28, 2),
                        (32, 64, 14, 2), (32, 32, 32, 1), (64, 64, 16, 1), (32, 64, 32, 2)]:
        times, flop, error = probe(c, o, hw, s)
        cell = {k: "/".join(f"{t:.2f}" for t in v) for k, v in times.items()}
        best = {k: min(v) for k, v in times.items()}
        print(f"| {c} -> {o}, {hw}x{hw}, stride {s} | {cell['forward']} ({best['pack']:.2f}, "
              f"{best['unpack']:.2f}) | {cell['ddl forward']} | {cell['weight grad']} | "
              f"{cell['ddl weight grad']} | {error:.1e} |", flush=True)
        print(f"|   GFLOP/s, best round | {flop / best['forward']:.0f} (without pack and unpack "
              f"{flop / (best['forward'] - best['pack'] - best['unpack']):.0f}) | "
              f"{flop / best['ddl forward']:.0f} | {flop / best['weight grad']:.0f} (without "
              f"pack {flop / (best['weight grad'] - best['pack']):.0f}) | "
              f"{flop / best['ddl weight grad']:.0f} | |", flush=True)


if __name__ == "__main__":
    main()

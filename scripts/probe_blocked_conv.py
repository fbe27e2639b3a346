"""Probe for issue 16's next step: a 3x3 convolution's forward pass with the channels blocked by 16
innermost and its sums held in vector registers, against ddl's direct kernel and PyTorch.

ddl's layout is (C, H, W, N): its kernels vectorise over the batch and broadcast every weight,
and their sums go back to memory once per input channel. oneDNN (PyTorch's CPU convolutions)
blocks channels by 16 instead: a vector holds 16 output channels' weights, each input value is
one broadcast, and a block of sums stays in registers through the whole sum over input channels
and taps. LLVM's vectoriser only vectorises innermost loops, so plain numba loops cannot keep
sums in registers across a loop that runs over input channels. This probe declares a numba type
whose data model is LLVM's <16 x float> and four intrinsics on it. A kernel written with them
keeps P pixels x 16*OV output channels of sums in registers.

Layouts: x (N, C/16, H+2, W+2, 16) zero-padded; w (O/(16 OV), C/16, 3, 3, 16 x 16 OV);
y (N, O/(16 OV), H, W x 16 OV). Not used by ddl's training (docs/speed.md says what it
measured). Run: python scripts/probe_blocked_conv.py
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
from ddl.kernels import arrays, direct  # noqa: E402
from ddl.kernels.tune import cpu_key  # noqa: E402

LANES = 16
VECTOR = ir.VectorType(ir.FloatType(), LANES)


class Vector(types.Type):
    def __init__(self):
        super().__init__(name="float32x16")


vector = Vector()
register_model(Vector)(lambda dmm, fe_type: models.PrimitiveModel(dmm, fe_type, VECTOR))


def _address(context, builder, array_type, array, index):
    data = context.make_array(array_type)(context, builder, array).data
    return builder.bitcast(builder.gep(data, [index]), VECTOR.as_pointer())


@intrinsic
def load(typingctx, a, i):
    """The 16 values of the C-contiguous array a from flat index i."""
    def codegen(context, builder, sig, args):
        return builder.load(_address(context, builder, sig.args[0], *args), align=4)
    return vector(a, i), codegen


@intrinsic
def store(typingctx, a, i, v):
    """a[i:i + 16] = v, a C-contiguous."""
    def codegen(context, builder, sig, args):
        builder.store(args[2], _address(context, builder, sig.args[0], args[0], args[1]), align=4)
        return context.get_dummy_value()
    return types.none(a, i, v), codegen


@intrinsic
def zero(typingctx):
    def codegen(context, builder, sig, args):
        return ir.Constant(VECTOR, [0.0] * LANES)
    return vector(), codegen


@intrinsic
def fma(typingctx, s, v, acc):
    """acc + s * v, the float32 s broadcast."""
    def codegen(context, builder, sig, args):
        lane = builder.insert_element(ir.Constant(VECTOR, ir.Undefined), args[0],
                                      ir.Constant(ir.IntType(32), 0))
        splat = builder.shuffle_vector(lane, ir.Constant(VECTOR, ir.Undefined),
                                       ir.Constant(ir.VectorType(ir.IntType(32), LANES),
                                                   [0] * LANES))
        product = builder.fmul(splat, args[1], flags=["fast"])
        return builder.fadd(product, args[2], flags=["fast"])
    return vector(types.float32, vector, vector), codegen


def blocked_kernel(pixels, vectors):
    """The forward kernel for blocks of `pixels` output pixels x 16*`vectors` output channels:
    its pixels*vectors sums are named variables, so its source is written out here."""
    oc = LANES * vectors
    sums = [f"a{p}_{v}" for p in range(pixels) for v in range(vectors)]
    body = [f"w{v} = load(wk, ic * {oc} + {LANES * v})" for v in range(vectors)]
    for p in range(pixels):
        body.append(f"s = xrow[q0 + {p} + j, ic]")
        body += [f"a{p}_{v} = fma(s, w{v}, a{p}_{v})" for v in range(vectors)]
    out = [f"store(ys, (q0 + {p}) * {oc} + {LANES * v}, a{p}_{v})"
           for p in range(pixels) for v in range(vectors)]
    source = f"""
def conv(xp, w, y):
    for n in range(xp.shape[0]):
        for ob in range(w.shape[0]):
            for r in range(y.shape[2]):
                ys = y[n, ob, r]
                for block in range(y.shape[3] // {oc * pixels}):
                    q0 = block * {pixels}       # (a range with a step: LLVM spilled sums)
                    {" = ".join(sums)} = zero()
                    for cb in range(xp.shape[1]):
                        for i in range(3):
                            xrow = xp[n, cb, r + i]
                            for j in range(3):
                                wk = w[ob, cb, i, j]
                                for ic in range({LANES}):
                                    {chr(10).join(' ' * 36 + line for line in body).lstrip()}
                    {chr(10).join(' ' * 20 + line for line in out).lstrip()}
"""
    namespace = dict(load=load, store=store, zero=zero, fma=fma)
    exec(source, namespace)
    return numba.njit(fastmath=True)(namespace["conv"])


def median_ms(fn, repeats=15):
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return float(np.median(times)) * 1e3


def probe(c, o, hw, pixels, vectors, n=64, rounds=3):
    """GFLOP/s of the blocked kernel, ddl's direct kernel and PyTorch's channels_last
    convolution (None without PyTorch), forward only, medians per round; and the blocked
    kernel's largest difference from the direct kernel, relative to the largest output."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((c, hw, hw, n), dtype=np.float32)           # ddl's (C, H, W, N)
    weight = rng.standard_normal((o, c, 3, 3), dtype=np.float32)
    oc = LANES * vectors
    xp = np.zeros((n, c // LANES, hw + 2, hw + 2, LANES), np.float32)
    xp[:, :, 1:-1, 1:-1] = x.reshape(c // LANES, LANES, hw, hw, n).transpose(4, 0, 2, 3, 1)
    wb = np.ascontiguousarray(weight.reshape(o // oc, oc, c // LANES, LANES, 3, 3)
                              .transpose(0, 2, 4, 5, 3, 1)).reshape(o // oc, c // LANES, 3, 3, -1)
    y = np.empty((n, o // oc, hw, hw * oc), np.float32)
    conv = blocked_kernel(pixels, vectors)
    ws, bias = arrays.Workspace(), np.zeros(o, np.float32)
    ref, _ = direct.forward(x, weight, bias, (1, 1), False, False, ws)
    conv(xp, wb, y)
    got = y.reshape(n, o // oc, hw, hw, oc).transpose(1, 4, 2, 3, 0).reshape(o, hw, hw, n)
    error = float(np.abs(got - ref).max() / np.abs(ref).max())
    contestants = {"blocked": lambda: conv(xp, wb, y),
                   "direct": lambda: direct.forward(x, weight, bias, (1, 1), False, False, ws)}
    try:
        import torch
        torch.set_num_threads(1)
        xt = torch.from_numpy(np.ascontiguousarray(x.transpose(3, 0, 1, 2))).contiguous(
            memory_format=torch.channels_last)
        layer = torch.nn.Conv2d(c, o, 3, padding=1, bias=False).to(
            memory_format=torch.channels_last)
        contestants["torch"] = torch.no_grad()(lambda: layer(xt))
    except ImportError:
        pass
    flop = 2 * o * c * 9 * hw * hw * n / 1e6
    rates = {name: [] for name in contestants}
    for _ in range(rounds):
        for name, fn in contestants.items():
            rates[name].append(flop / median_ms(fn))
    return rates, error


def main():
    threadpool_limits(1)
    kernels.get("numba")        # ddl's LLVM options and CPU name, for the direct kernel and this
    print(f"{cpu_key().split(' flags:')[0]}, numba compiling for {kernels.target()}, batch 64, "
          "one thread, forward only; GFLOP/s, medians of 15 calls, per round\n")
    print("| layer | block | blocked | ddl direct | PyTorch channels_last | difference |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for c, o, hw, pixels, vectors in [(64, 64, 7, 7, 2), (32, 32, 14, 14, 2),
                                      (64, 64, 16, 8, 2), (32, 32, 32, 8, 2),
                                      (16, 16, 28, 14, 1)]:
        rates, error = probe(c, o, hw, pixels, vectors)
        cells = ["/".join(f"{r:.0f}" for r in rates[k]) if k in rates else "-"
                 for k in ("blocked", "direct", "torch")]
        print(f"| {c} -> {o}, {hw}x{hw} | {pixels} px x {LANES * vectors} ch | "
              + " | ".join(cells) + f" | {error:.1e} |", flush=True)


if __name__ == "__main__":
    main()

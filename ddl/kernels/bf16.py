"""`--compress bf16`'s two passes over the gradients (ddl/exchange.py), each one loop instead of
NumPy's five to eight passes over whole buckets; ddl/kernels/numpy.py holds the reference, and
both give the same bits.

bfloat16 is float32's upper 16 bits: rounding keeps them, to nearest with ties to even, by adding
0x7FFF plus the lowest kept bit before the shift; a NaN keeps a quiet NaN's bits (the addition could
carry it into inf) and what rounds past bf16's largest value becomes inf, as the carry gives.
"""
import numpy as np

from ddl.kernels.jit import kernel

BLOCK = 1024        # values widened at a time, in a scratch array that stays in L1


@kernel("(float32[::1], uint16[::1])")
def round_bf16(x, out):
    """out[i] = x[i] rounded to bfloat16, as its bits."""
    bits = x.view(np.uint32)
    for i in range(bits.shape[0]):
        b = bits[i]
        rounded = np.uint16((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1)))
                            >> np.uint32(16))
        nan = (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
        out[i] = np.uint16(0x7FC0) if nan else rounded


@kernel("(uint16[:, ::1], float32[::1])")
def sum_bf16(every, out):
    """out = every[0] + every[1] + ... in float32, in that order: the ranks' bf16 bits (R, n)
    widened exactly to float32 and summed."""
    wide = np.empty(BLOCK, np.uint32)
    values = wide.view(np.float32)
    for lo in range(0, out.shape[0], BLOCK):
        hi = min(lo + BLOCK, out.shape[0])
        part = out[lo:hi]
        for r in range(every.shape[0]):
            row = every[r, lo:hi]
            for i in range(hi - lo):
                wide[i] = np.uint32(row[i]) << np.uint32(16)
            if r == 0:
                part[:] = values[:hi - lo]
            else:
                for i in range(hi - lo):
                    part[i] += values[i]

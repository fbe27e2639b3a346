"""Winograd F(2x2, 3x3) convolution for 3x3, stride-1 layers (Lavin and Gray, 2016).

A 2x2 tile of outputs depends on a 4x4 tile d of one input channel (tiles overlap by 2 pixels).
For a 3x3 kernel g:

    y = A^T [(G g G^T) * (B^T d B)] A        (* is elementwise over the 16 tile positions)

    B^T = [[1,  0, -1,  0],    G = [[1,    0,   0  ],    A^T = [[1, 1,  1,  0],
           [0,  1,  1,  0],         [1/2,  1/2, 1/2],           [0, 1, -1, -1]]
           [0, -1,  1,  0],         [1/2, -1/2, 1/2],
           [0,  1,  0, -1]]         [0,    0,   1  ]]

Summed over input channels, each tile position k is one matrix product
M[k] (O, T*N) = U[k] (O, C) @ V[k] (C, T*N), for U = G g G^T and V = B^T d B over all T tiles: 16
BLAS GEMMs with 16/36 of a direct convolution's multiplications. The backward pass runs the
adjoints of the same linear maps: 16 GEMMs with V and then G^T (.) G give the weight gradient,
16 GEMMs with U and then B (.) B^T give the input gradient, added up over overlapping tiles.

Layout: x (C, H, W, N), V (16, C, T, N), M (16, O, T, N), the batch innermost, so each kernel's
inner loop runs over the batch with unit stride. A 2x2 max pool over the output is exactly one
tile, so `pool=True` pools (and applies ReLU) while leaving a tile, never writing the full output.
"""
import numpy as np

from ddl.kernels import arrays
from ddl.kernels.jit import X4, helper, kernel
from ddl.kernels.pool import first_max4, spread4



@helper
def _bt(d0, d1, d2, d3):
    """B^T d."""
    return d0 - d2, d1 + d2, d2 - d1, d1 - d3


@helper
def _b(v0, v1, v2, v3):
    """B v, the adjoint of B^T."""
    return v0, v1 - v2 + v3, v1 + v2 - v0, -v3


@helper
def _g(g0, g1, g2):
    """G g, in float64 (the weights are few; the tuple must have one type)."""
    return 1.0 * g0, 0.5 * (g0 + g1 + g2), 0.5 * (g0 - g1 + g2), 1.0 * g2


@helper
def _gt(u0, u1, u2, u3):
    """G^T u, the adjoint of G."""
    return u0 + 0.5 * (u1 + u2), 0.5 * (u1 - u2), 0.5 * (u1 + u2) + u3


@helper
def _at(m0, m1, m2, m3):
    """A^T m."""
    return m0 + m1 + m2, m1 - m2 - m3


@helper
def _a(y0, y1):
    """A y, the adjoint of A^T."""
    return y0, y0 + y1, y0 - y1, -y1


# --- kernels: each applies a 1-D transform to the rows of a tile, then to its columns ------------
@kernel(f"({X4}, T[:, :, ::1])")
def transform_weights(w, U):
    """U[4a + b, o, c] = (G w[o, c] G^T)[a, b]; w (O, C, 3, 3), U (16, O, C)."""
    for o in range(w.shape[0]):
        for c in range(w.shape[1]):
            r0 = _g(w[o, c, 0, 0], w[o, c, 0, 1], w[o, c, 0, 2])
            r1 = _g(w[o, c, 1, 0], w[o, c, 1, 1], w[o, c, 1, 2])
            r2 = _g(w[o, c, 2, 0], w[o, c, 2, 1], w[o, c, 2, 2])
            for b in range(4):
                u = _g(r0[b], r1[b], r2[b])
                for a in range(4):
                    U[4 * a + b, o, c] = u[a]


@kernel(f"(T[:, :, ::1], {X4})")
def add_weight_grad(gU, gw):
    """gw[o, c] += G^T gU[:, o, c] G (gU as 4x4), the adjoint of transform_weights."""
    for o in range(gw.shape[0]):
        for c in range(gw.shape[1]):
            r0 = _gt(gU[0, o, c], gU[1, o, c], gU[2, o, c], gU[3, o, c])
            r1 = _gt(gU[4, o, c], gU[5, o, c], gU[6, o, c], gU[7, o, c])
            r2 = _gt(gU[8, o, c], gU[9, o, c], gU[10, o, c], gU[11, o, c])
            r3 = _gt(gU[12, o, c], gU[13, o, c], gU[14, o, c], gU[15, o, c])
            for j in range(3):
                g = _gt(r0[j], r1[j], r2[j], r3[j])
                for i in range(3):
                    gw[o, c, i, j] += g[i]


@kernel(f"({X4}, {X4}, int64, int64)")
def input_tiles(x, V, th, tw):
    """V[4a + b, c, t, n] = (B^T d B)[a, b] for the tile t = tr*tw + tc, d = x[c, 2tr:2tr+4,
    2tc:2tc+4, n]; x (C, H, W, N) with H >= 2*th + 2 and W >= 2*tw + 2."""
    for c in range(x.shape[0]):
        for tr in range(th):
            for tc in range(tw):
                t, i, j = tr * tw + tc, 2 * tr, 2 * tc
                for n in range(x.shape[3]):
                    r0 = _bt(x[c, i, j, n], x[c, i, j + 1, n], x[c, i, j + 2, n],
                             x[c, i, j + 3, n])
                    r1 = _bt(x[c, i + 1, j, n], x[c, i + 1, j + 1, n], x[c, i + 1, j + 2, n],
                             x[c, i + 1, j + 3, n])
                    r2 = _bt(x[c, i + 2, j, n], x[c, i + 2, j + 1, n], x[c, i + 2, j + 2, n],
                             x[c, i + 2, j + 3, n])
                    r3 = _bt(x[c, i + 3, j, n], x[c, i + 3, j + 1, n], x[c, i + 3, j + 2, n],
                             x[c, i + 3, j + 3, n])
                    for b in range(4):
                        v = _bt(r0[b], r1[b], r2[b], r3[b])
                        for a in range(4):
                            V[4 * a + b, c, t, n] = v[a]


@kernel(f"({X4}, {X4})")
def input_tiles_grad(gV, gD):
    """gD[4a + b, c, t, n] = (B gV[:, c, t, n] B^T)[a, b] (gV as 4x4): the gradient of each
    input tile, the adjoint of input_tiles before overlapping tiles are added up."""
    for c in range(gV.shape[1]):
        for t in range(gV.shape[2]):
            for n in range(gV.shape[3]):
                r0 = _b(gV[0, c, t, n], gV[1, c, t, n], gV[2, c, t, n], gV[3, c, t, n])
                r1 = _b(gV[4, c, t, n], gV[5, c, t, n], gV[6, c, t, n], gV[7, c, t, n])
                r2 = _b(gV[8, c, t, n], gV[9, c, t, n], gV[10, c, t, n], gV[11, c, t, n])
                r3 = _b(gV[12, c, t, n], gV[13, c, t, n], gV[14, c, t, n], gV[15, c, t, n])
                for b in range(4):
                    g = _b(r0[b], r1[b], r2[b], r3[b])
                    for a in range(4):
                        gD[4 * a + b, c, t, n] = g[a]


@kernel(f"({X4}, {X4}, int64, int64)")
def add_up_tiles(gD, gx, th, tw):
    """gx[c, y, x, n] = the sum of gD[4a + b, c, t, n] over the tiles t = (tr, tc) holding pixel
    (y, x) = (2tr + a, 2tc + b): up to four, as tiles overlap by two pixels. Each pixel is
    written once (adding into gx tile by tile costs 16 read-modify-writes per tile)."""
    for c in range(gx.shape[0]):
        for y in range(gx.shape[1]):
            for x in range(gx.shape[2]):
                out = gx[c, y, x]
                out[:] = 0
                for tr in range(max(0, (y - 2) // 2), min(th, y // 2 + 1)):
                    for tc in range(max(0, (x - 2) // 2), min(tw, x // 2 + 1)):
                        g = gD[4 * (y - 2 * tr) + x - 2 * tc, c, tr * tw + tc]
                        for n in range(out.shape[0]):
                            out[n] += g[n]


@helper
def _output_tile(M, o, t, n):
    """A^T M[:, o, t, n] A (M's 16 entries as a 4x4 tile): the 2x2 outputs y00, y01, y10, y11."""
    r0 = _at(M[0, o, t, n], M[1, o, t, n], M[2, o, t, n], M[3, o, t, n])
    r1 = _at(M[4, o, t, n], M[5, o, t, n], M[6, o, t, n], M[7, o, t, n])
    r2 = _at(M[8, o, t, n], M[9, o, t, n], M[10, o, t, n], M[11, o, t, n])
    r3 = _at(M[12, o, t, n], M[13, o, t, n], M[14, o, t, n], M[15, o, t, n])
    left, right = _at(r0[0], r1[0], r2[0], r3[0]), _at(r0[1], r1[1], r2[1], r3[1])
    return left[0], right[0], left[1], right[1]


@helper
def _set_tile_grad(gM, o, t, n, g00, g01, g10, g11):
    """gM[:, o, t, n] = A g A^T for the 2x2 output gradient g: the adjoint of _output_tile."""
    top, bottom = _a(g00, g01), _a(g10, g11)
    for b in range(4):
        col = _a(top[b], bottom[b])
        for a in range(4):
            gM[4 * a + b, o, t, n] = col[a]


@kernel(f"({X4}, T[::1], {X4})")
def output_tiles(M, bias, y):
    """y (O, OH, OW, N) from the tiles: y[o, 2tr + a, 2tc + b, n] = (A^T M[:, o, t, n] A)[a, b]
    + bias[o], the last tile row and column cropped when OH or OW is odd."""
    oh, ow = y.shape[1], y.shape[2]
    tw = (ow + 1) // 2
    for o in range(y.shape[0]):
        for tr in range((oh + 1) // 2):
            for tc in range(tw):
                t, i, j = tr * tw + tc, 2 * tr, 2 * tc
                whole = i + 1 < oh and j + 1 < ow
                for n in range(y.shape[3]):
                    y00, y01, y10, y11 = _output_tile(M, o, t, n)
                    y[o, i, j, n] = y00 + bias[o]
                    if whole:
                        y[o, i, j + 1, n] = y01 + bias[o]
                        y[o, i + 1, j, n] = y10 + bias[o]
                        y[o, i + 1, j + 1, n] = y11 + bias[o]
                    else:
                        if j + 1 < ow:
                            y[o, i, j + 1, n] = y01 + bias[o]
                        if i + 1 < oh:
                            y[o, i + 1, j, n] = y10 + bias[o]


@kernel(f"({X4}, {X4}, T[::1])")
def output_tiles_grad(gy, gM, gb):
    """gM[:, o, t, n] = A g A^T for each 2x2 tile g of gy (O, OH, OW, N), zero past its edge: the
    adjoint of output_tiles; gb[o] += the sum of gy[o]."""
    oh, ow = gy.shape[1], gy.shape[2]
    tw, zero = (ow + 1) // 2, gy.dtype.type(0)
    for o in range(gy.shape[0]):
        total = zero
        for tr in range((oh + 1) // 2):
            for tc in range(tw):
                t, i, j = tr * tw + tc, 2 * tr, 2 * tc
                right, below = j + 1 < ow, i + 1 < oh
                for n in range(gy.shape[3]):
                    g00 = gy[o, i, j, n]
                    g01 = gy[o, i, j + 1, n] if right else zero
                    g10 = gy[o, i + 1, j, n] if below else zero
                    g11 = gy[o, i + 1, j + 1, n] if right and below else zero
                    total += g00 + g01 + g10 + g11
                    _set_tile_grad(gM, o, t, n, g00, g01, g10, g11)
        gb[o] += total


@kernel(f"({X4}, T[::1], boolean, {X4}, uint8[:, :, :, ::1])")
def pooled_output_tiles(M, bias, relu, y, code):
    """y[o, tr, tc, n] = the maximum of tile t's 2x2 outputs (+ bias[o]), then ReLU if `relu`;
    code: which output was the first maximum (see pool.first_max4). y, code (O, TH, TW, N)."""
    th, tw = y.shape[1], y.shape[2]
    for o in range(y.shape[0]):
        for tr in range(th):
            for tc in range(tw):
                t = tr * tw + tc
                for n in range(y.shape[3]):
                    y00, y01, y10, y11 = _output_tile(M, o, t, n)
                    value, k = first_max4(y00 + bias[o], y01 + bias[o], y10 + bias[o],
                                          y11 + bias[o], relu)
                    y[o, tr, tc, n], code[o, tr, tc, n] = value, k


@kernel(f"({X4}, uint8[:, :, :, ::1], {X4}, T[::1])")
def pooled_output_tiles_grad(gy, code, gM, gb):
    """The adjoint of pooled_output_tiles: each pooled gradient goes to its tile's first maximum
    (nothing where ReLU cut); gb[o] += the gradients that passed."""
    th, tw = gy.shape[1], gy.shape[2]
    for o in range(gy.shape[0]):
        total = gb.dtype.type(0)
        for tr in range(th):
            for tc in range(tw):
                t = tr * tw + tc
                for n in range(gy.shape[3]):
                    g00, g01, g10, g11 = spread4(gy[o, tr, tc, n], code[o, tr, tc, n])
                    total += g00 + g01 + g10 + g11
                    _set_tile_grad(gM, o, t, n, g00, g01, g10, g11)
        gb[o] += total


# --- the layer: transforms around 16 GEMMs ------------------------------------------------------
def _gemms(a, b, out, transpose_a=False, transpose_b=False):
    """out[k] = a[k] @ b[k] for the 16 tile positions (with a[k] or b[k] transposed): one
    stacked matmul, which NumPy hands to BLAS matrix by matrix, without 16 calls from Python."""
    np.matmul(a.transpose(0, 2, 1) if transpose_a else a,
              b.transpose(0, 2, 1) if transpose_b else b, out=out)


def tile_grid(out_hw, pool):
    """(TH, TW): tiles covering the output (pool=False) or the outputs a 2x2 pool reads."""
    return tuple(size // 2 if pool else (size + 1) // 2 for size in out_hw)


def forward(x, weight, bias, padding, pool, relu, ws):
    """x (C, H, W, N), bias (O,) -> (y, ctx): y (O, OH, OW, N), or (O, OH//2, OW//2, N)
    max-pooled 2x2 (and ReLU'd if `relu`) when `pool`. ctx is what `backward` needs; it lives in
    the Workspace ws."""
    c, h, w, n = x.shape
    o = weight.shape[0]
    (ph, pw) = padding
    out_hw = (h + 2 * ph - 2, w + 2 * pw - 2)
    th, tw = tile_grid(out_hw, pool)
    xp = arrays.pad(x, padding, ws, (2 * th + 2, 2 * tw + 2))
    U = ws.empty("U", (16, o, c), x.dtype)
    transform_weights(weight, U)
    V = ws.empty("V", (16, c, th * tw, n), x.dtype)
    input_tiles(xp, V, th, tw)
    M = ws.empty("M", (16, o, th * tw, n), x.dtype)
    _gemms(U, V.reshape(16, c, -1), M.reshape(16, o, -1))
    if pool:
        y, code = arrays.empty((o, th, tw, n), x.dtype), arrays.empty((o, th, tw, n), np.uint8)
        pooled_output_tiles(M, bias, relu, y, code)
    else:
        y, code = arrays.empty((o, *out_hw, n), x.dtype), None
        output_tiles(M, bias, y)
    return y, (xp.shape, U, V, code, th, tw)


def backward(gy, ctx, weight, grad_w, grad_b, input_grad, ws):
    """gy like forward's y -> the gradient of the padded input (C, H', W', N), which the caller
    crops, or None; adds into grad_w (O, C, 3, 3) and grad_b (O,). `weight` is unused: forward
    kept its transform."""
    xp_shape, U, V, code, th, tw = ctx
    o, c = U.shape[1:]
    gM = ws.empty("M", (16, o, th * tw, gy.shape[-1]), gy.dtype)
    if code is None:
        output_tiles_grad(gy, gM, grad_b)
    else:
        pooled_output_tiles_grad(gy, code, gM, grad_b)
    gM2 = gM.reshape(16, o, -1)
    gU = ws.empty("gU", (16, o, c), gy.dtype)
    _gemms(gM2, V.reshape(16, c, -1), gU, transpose_b=True)
    add_weight_grad(gU, grad_w)
    if not input_grad:
        return None
    gV = ws.empty("gV", V.shape, gy.dtype)
    _gemms(U, gM2, gV.reshape(16, c, -1), transpose_a=True)
    gD = ws.empty("gD", V.shape, gy.dtype)
    input_tiles_grad(gV, gD)
    gxp = arrays.empty(xp_shape, gy.dtype)
    add_up_tiles(gD, gxp, th, tw)
    return gxp


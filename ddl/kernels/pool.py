"""Max pooling (optionally followed by ReLU in the same pass) and ReLU.

Max pooling records, per window, the row-major index of its FIRST maximum (PyTorch's argmax;
ties are common on MNIST's blank borders and must neither split nor duplicate the gradient) as a
uint8 `code`; CUT marks a window whose maximum ReLU set to zero, which passes no gradient back.
ReLU after max pooling equals max pooling after ReLU, gradients included, so either layer order
fuses into one pass. A NaN anywhere in a window makes its output NaN, as in NumPy, so a diverging
run is never hidden.

Arrays are (C, H, W, N), the batch innermost; ReLU works on flat arrays of any layout.
"""
from ddl.kernels.jit import X4, helper, kernel

CUT = 255
CODE = "uint8[:, :, :, ::1]"


@helper
def first_max4(y00, y01, y10, y11, relu):
    """(maximum, code) of a 2x2 window: code is the row-major index 0..3 of its first maximum,
    or CUT (and the maximum 0) when `relu` cuts it."""
    best, k = y00, 0
    if y01 > best:
        best, k = y01, 1
    if y10 > best:
        best, k = y10, 2
    if y11 > best:
        best, k = y11, 3
    if y00 != y00 or y01 != y01 or y10 != y10 or y11 != y11:
        best = y00 + y01 + y10 + y11    # NaN
    if relu and best <= 0:
        return 0.0, CUT
    return best, k


@helper
def spread4(g, k):
    """The gradients of a 2x2 window's four inputs when `g` reaches its output and `k` is its
    code: all of g to the first maximum."""
    zero = g - g
    return (g if k == 0 else zero, g if k == 1 else zero, g if k == 2 else zero,
            g if k == 3 else zero)


@kernel(f"({X4}, int64, int64, int64, int64, boolean, {X4}, {CODE})")
def max_pool(x, kh, kw, sh, sw, relu, y, code):
    """y[c, r, q] = the maximum of x[c, r*sh : r*sh + kh, q*sw : q*sw + kw] (ReLU'd if relu) and
    its code: x (C, H, W, N) -> y, code (C, OH, OW, N)."""
    for c in range(y.shape[0]):
        for r in range(y.shape[1]):
            for q in range(y.shape[2]):
                for n in range(y.shape[3]):
                    y[c, r, q, n] = x[c, r * sh, q * sw, n]
                    code[c, r, q, n] = 0
                for i in range(kh):
                    for j in range(kw):
                        if i or j:
                            for n in range(y.shape[3]):
                                v = x[c, r * sh + i, q * sw + j, n]
                                if v > y[c, r, q, n] or v != v:
                                    y[c, r, q, n] = v
                                    code[c, r, q, n] = i * kw + j
                if relu:
                    for n in range(y.shape[3]):
                        if y[c, r, q, n] <= 0:
                            y[c, r, q, n] = 0
                            code[c, r, q, n] = CUT


@kernel(f"({X4}, {CODE}, int64, int64, int64, int64, {X4})")
def max_pool_grad(gy, code, kh, kw, sh, sw, gx):
    """gx[c, r*sh + i, q*sw + j] += gy[c, r, q] where (i, j) is the window's code: the adjoint of
    max_pool; gx (C, H, W, N) starts at zero (overlapping windows add up)."""
    for c in range(gy.shape[0]):
        for r in range(gy.shape[1]):
            for q in range(gy.shape[2]):
                for i in range(kh):
                    for j in range(kw):
                        k = i * kw + j
                        for n in range(gy.shape[3]):
                            if code[c, r, q, n] == k:
                                gx[c, r * sh + i, q * sw + j, n] += gy[c, r, q, n]


@kernel("(T[::1], T[::1])")
def relu(x, y):
    """y = max(x, 0) elementwise, NaN kept."""
    for i in range(x.shape[0]):
        y[i] = 0 if x[i] <= 0 else x[i]


@kernel("(T[::1], T[::1], T[::1])")
def relu_grad(y, gy, gx):
    """gx = gy where the ReLU's output y > 0, else 0."""
    for i in range(y.shape[0]):
        gx[i] = gy[i] if y[i] > 0 else 0

"""Array helpers that every backend and the layers share: argument shapes, the (C, H, W, N)
memory order of activations (see ddl/kernels/numpy.py), arrays aligned for the compiled kernels,
scratch arrays kept between calls, and zero-padded copies of an input."""
import ctypes
import math
import platform

import numpy as np

# Bytes: one cache line, one AVX-512 vector. NumPy's arrays start 16 bytes into a line (malloc's
# alignment), so every 64-byte vector load of a compiled loop straddled two cache lines; the
# kernels' arrays start on a line instead (docs/speed.md has what it gained).
ALIGN = 64


def empty(shape, dtype):
    """np.empty(shape, dtype), C-ordered, its first element on an ALIGN-byte boundary."""
    return _aligned(np.empty, shape, dtype)


def zeros(shape, dtype):
    """np.zeros(shape, dtype), aligned as `empty` (and as lazily zeroed as np.zeros)."""
    return _aligned(np.zeros, shape, dtype)


def empty_like(a):
    """An aligned np.empty_like(a): a's shape and dtype, its axes in a's memory order, so that a
    (C, H, W, N) array seen as (N, C, H, W) gets the same view of memory laid out alike."""
    order = sorted(range(a.ndim), key=lambda i: -a.strides[i])
    return empty([a.shape[i] for i in order], a.dtype).transpose(
        sorted(range(a.ndim), key=order.__getitem__))


def _aligned(make, shape, dtype):
    # Plain Python on purpose: a step allocates dozens of arrays, and NumPy's helpers on small
    # tuples (np.prod, np.argsort) cost microseconds each.
    dtype = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    size = math.prod(shape) * dtype.itemsize
    raw = make(size + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start:start + size].view(dtype).reshape(shape)


# glibc's mallopt parameters (malloc.h), and the largest mmap threshold it accepts on 64 bits.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD, TRIM_THRESHOLD = 32 << 20, 1 << 30


def keep_freed_memory():
    """Have glibc's malloc keep the memory that a step frees for the next step's arrays. By
    default it returns freed blocks of more than 128 KB (a threshold it raises as it goes) to the
    kernel and the top of its heap past twice that, and a step's new multi-MB activations then
    fault in fresh zeroed pages, page by page (docs/speed.md has what vgg-mini lost). Blocks
    under 32 MB now come from the heap, which keeps up to 1 GB free. Process-wide, and done
    when a backend is first loaded (kernels.get). Returns whether malloc took the settings
    (not on other C libraries)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD,
                                                                      TRIM_THRESHOLD))


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


def matmul_like(a, b, like):
    """a @ b stored in the memory order of `like` (C or Fortran): the gradient of an input comes
    back laid out like that input, so the layers before it keep their memory order."""
    if like.flags.f_contiguous and not like.flags.c_contiguous:
        return (b.T @ a.T).T
    return a @ b


class Workspace:
    """Scratch arrays kept from one call to the next, by name. A layer's big temporaries (the
    im2col columns: 9 MB for ref-cnn's second convolution at batch 64, 36 MB at 256) have the same
    shape every step, and a fresh multi-MB array costs page faults on every step."""

    def __init__(self):
        self._arrays = {}

    def empty(self, name, shape, dtype):
        a = self._arrays.get(name)
        if a is None or a.shape != shape or a.dtype != dtype:
            a = self._arrays[name] = empty(shape, dtype)
        return a

    def zeros(self, name, shape, dtype):
        """As `empty`, but zeroed when it is made: for a buffer whose every use writes one same
        part of it (a padded input's interior), so that the rest stays zero."""
        a = self._arrays.get(name)
        if a is None or a.shape != shape or a.dtype != dtype:
            a = self._arrays[name] = zeros(shape, dtype)
        return a


def chwn(x):
    """x (N, C, H, W) as contiguous (C, H, W, N) memory: a view when it already is."""
    t = x.transpose(1, 2, 3, 0)
    return t if t.flags.c_contiguous else np.ascontiguousarray(t)


def nchw(a):
    """(C, H, W, N) memory seen as (N, C, H, W)."""
    return a.transpose(3, 0, 1, 2)


def pad(x, padding, ws, min_hw=(0, 0)):
    """x (C, H, W, N) zero-padded by `padding` and, past that, to at least min_hw rows and
    columns; x itself when it needs neither."""
    (ph, pw), (c, h, w, n) = padding, x.shape
    hp, wp = max(h + 2 * ph, min_hw[0]), max(w + 2 * pw, min_hw[1])
    if (hp, wp) == (h, w):
        return x
    # One layer's inputs have one shape and padding (the buffer's name says which), so the
    # border, zeroed once, stays zero.
    xp = ws.zeros(f"x_padded {padding}", (c, hp, wp, n), x.dtype)
    xp[:, ph:ph + h, pw:pw + w] = x
    return xp

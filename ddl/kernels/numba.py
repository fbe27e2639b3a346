"""The numba backend: the operations of ddl/kernels/numpy.py, with the same arguments and results,
run by compiled kernels, plus the fused passes that only this backend has (a convolution with
the 2x2 max pool and ReLU after it; max pooling with its ReLU), which its `plan` groups.

A convolution runs one of the algorithms of `_ALGORITHMS` that fit its shape: the one measured
fastest for that shape when the model's plan was made (ddl/kernels/convplan.py), else the fixed
rule of `algorithm`: single.py's kernels for stride-1 layers of one input channel (pooled: a
first layer), Winograd F(2x2, 3x3) for 3x3 stride-1 layers with 32 or more input and 64 or
more output channels, a direct convolution for other stride-1 layers (padded by less than the
kernel's size), direct loops over the input's phases for strided layers larger than 1x1 with few
input channels (strided.py), and one GEMM on a compiled im2col panel (gemm.py) for the rest:
other strided layers, 1x1 layers (an unpadded one of stride 1 needs no panel) and stride-1 layers
padded by a kernel's size.
Activations keep the NumPy backend's memory order, (C, H, W, N) with the batch innermost,
behind logically (N, C, H, W) arrays, so layers of either backend can follow one another.
"""
import sys
from typing import NamedTuple

import numpy as np

from ddl.kernels import (arrays, bf16, convplan, direct, gemm, jit, loss, norm, optim, pool, single,
                         strided, winograd)
from ddl.kernels import numpy as reference
from ddl.kernels.arrays import Workspace, chwn, nchw, out_size

name = "numba"
jit.mark_ahead()    # every kernel module is imported: their kernels are those `warm` compiles
# Imported directly rather than through kernels.get, the kernels would compile on first call
# without ddl's LLVM options, CPU name or cache: ten times slower, and silently so.
jit.configure()

# Winograd's GEMMs are (O x C) @ (C x tiles*N): thin, and slower than the direct kernel, with
# fewer channels than these. Per-layer medians of forward + backward, one thread, batch 64, on a
# 2-core Xeon under heavy load (2026-12-06), direct vs Winograd: 16 -> 16 at 28x28 9.3 vs 16.4 ms;
# 32 -> 32 at 14x14 6.9 vs 9.1, at 32x32 40-50 vs 58; but 32 -> 64 at 14x14 16.4-16.8 vs 12.2-15.4,
# 64 -> 64 at 8x8 8.9-9.8 vs 7.1-7.5 (at 7x7 6.5-6.9 vs 6.8-7.6, even), and ref-cnn (32 -> 64 at
# 13x13, pooled) trained at 1.56x PyTorch's speed with Winograd, 1.01x with direct.
WINOGRAD_MIN_CHANNELS, WINOGRAD_MIN_OUTPUTS = 32, 64
# A strided layer's GEMM (gemm.py) gains on the phase kernels (strided.py) with its inner
# dimension, C*kh*kw. Per-layer medians of thread CPU time, forward + backward, one thread, batch
# 64, interleaved, on a 2-core Xeon loaded by other jobs (2026-12-06), four runs, two of them
# with NUMBA_CPU_NAME=haswell, GEMM vs phases, 3x3 of stride 2: 16 -> 32 channels on 28x28
# 7.7-9.3 vs 6.2-7.3 ms; 32 -> 64 on 14x14 4.0-5.0 vs 4.3-5.2.
STRIDED_MAX_CHANNELS = 31


class Algorithm(NamedTuple):
    """One way to compute a convolution, in the signatures of gemm.py:
    forward(x (C, H, W, N), weight (O, C, kh, kw), bias (O,) or None, stride, padding, out_hw, ws)
    -> (y (O, OH, OW, N), ctx), with pool=True (and relu=) too when it `fuses`: y then max-pooled
    2x2 (and ReLU'd), (O, OH//2, OW//2, N);
    backward(grad_y, ctx, weight, x_shape (C, H, W, N), stride, padding, input_grad, ws) ->
    (grad x (C, H, W, N) or None unless input_grad, grad weight, grad bias);
    fits(weight_shape, stride, padding): whether it computes that convolution."""
    forward: object
    backward: object
    fits: object
    fuses: bool = False


def _accumulating(backward_into):
    """Algorithm's backward for a kernel module's `backward(gy, ctx, weight, grad_w, grad_b,
    input_grad, ws)`, which adds into zeroed parameter gradients and returns the input's."""
    def backward(gy, ctx, weight, x_shape, stride, padding, input_grad, ws):
        grad_w, grad_b = np.zeros_like(weight), np.zeros(weight.shape[0], weight.dtype)
        gx = backward_into(gy, ctx, weight, grad_w, grad_b, input_grad, ws)
        if gx is not None and gx.shape != x_shape:     # Winograd's: of the padded input
            (ph, pw), (h, w) = padding, x_shape[1:3]
            gx = gx[:, ph:ph + h, pw:pw + w]
        return gx, grad_w, grad_b
    return backward


def _stride_one(module):
    """The forward and backward of `module` (direct or winograd: stride 1 only, a 2x2 max pool
    and ReLU fused on request) in the signatures of Algorithm."""
    def forward(x, weight, bias, stride, padding, out_hw, ws, pool=False, relu=False):
        b = np.zeros(weight.shape[0], weight.dtype) if bias is None else bias
        return module.forward(x, weight, b, padding, pool, relu, ws)
    return forward, _accumulating(module.backward)


def _direct_fits(weight_shape, stride, padding):
    return tuple(stride) == (1, 1) and direct.fits(weight_shape, padding)


def _winograd_fits(weight_shape, stride, padding):
    return tuple(weight_shape[2:]) == (3, 3) and _direct_fits(weight_shape, stride, padding)


def _single_fits(weight_shape, stride, padding):
    return tuple(stride) == (1, 1) and single.fits(weight_shape, padding)


# The candidates for every convolution, in the order that a tie between their timings keeps.
_ALGORITHMS = {"gemm": Algorithm(gemm.forward, gemm.backward, lambda *shape: True),
               "direct": Algorithm(*_stride_one(direct), _direct_fits, fuses=True),
               "winograd": Algorithm(*_stride_one(winograd), _winograd_fits, fuses=True),
               "single": Algorithm(*_stride_one(single), _single_fits, fuses=True),
               "strided": Algorithm(strided.forward, _accumulating(strided.backward),
                                    strided.fits)}


def candidates(conv):
    """The names of the algorithms that compute `conv` (a convplan.Conv), its fused pool too."""
    return [name for name, a in _ALGORITHMS.items()
            if a.fits(conv.weight, conv.stride, conv.padding) and (a.fuses or not conv.pool)]


def algorithm(weight_shape, stride, padding=(0, 0), pool=False):
    """The fixed rule, for a shape that no measurement chose for: "single", "direct",
    "winograd", "strided" or "gemm" for a convolution with this weight (O, C, kh, kw) (and a
    fused pool)."""
    o, c, kh, kw = weight_shape
    if strided.fits(weight_shape, stride, padding) and c <= STRIDED_MAX_CHANNELS:
        return "strided"
    if not _direct_fits(weight_shape, stride, padding) or ((kh, kw) == (1, 1) and not pool):
        return "gemm"
    if single.fits(weight_shape, padding):
        return "single"
    big = c >= WINOGRAD_MIN_CHANNELS and o >= WINOGRAD_MIN_OUTPUTS
    return "winograd" if big and _winograd_fits(weight_shape, stride, padding) else "direct"


def choice(conv):
    """The algorithm that runs `conv` (a convplan.Conv): $DDL_CONV_ALGORITHM where that fits,
    else the adopted plan's, else the fixed rule's."""
    fit, forced = candidates(conv), forced_algorithm()
    if forced in fit:
        return forced
    chosen = convplan.chosen(conv)
    return chosen if chosen in fit else algorithm(conv.weight, conv.stride, conv.padding,
                                                  conv.pool)


def forced_algorithm():
    """$DDL_CONV_ALGORITHM, or None; a UsageError unless it names one of _ALGORITHMS."""
    return convplan.forced(_ALGORITHMS)


def fusable(conv, pool_layer):
    """Whether `conv` (a Conv2d) followed by `pool_layer` (a MaxPool2d) runs as one fused pass:
    whether an algorithm that fuses fits it, which the plan's choice then keeps to."""
    return (pool_layer.kernel_size == pool_layer.stride == (2, 2)
            and any(a.fuses and a.fits(conv.weight.shape, conv.stride, conv.padding)
                    for a in _ALGORITHMS.values()))


def conv2d_forward(x, weight, bias, stride, padding, ws=None, pool=False, relu=False, algo=None):
    """As reference.conv2d_forward; with `pool` (a fusable layer), max-pooled 2x2 and, with
    `relu`, ReLU'd in the same pass: y (N, O, OH//2, OW//2). `algo` forces an algorithm that
    fits (`candidates`)."""
    conv = convplan.Conv(tuple(weight.shape), tuple(stride), tuple(padding), tuple(x.shape),
                         x.dtype.name, pool, relu)
    algo = algo or choice(conv)
    convplan.note(conv)
    # For every algorithm: out_size refuses a kernel larger than the padded input in words (the
    # direct and Winograd kernels would fail on a negative array shape).
    (kh, kw), (h, w) = weight.shape[2:], x.shape[2:]
    out_hw = (out_size(h, kh, stride[0], padding[0]), out_size(w, kw, stride[1], padding[1]))
    fused = {"pool": True, "relu": relu} if pool else {}
    y, ctx = _ALGORITHMS[algo].forward(chwn(x), weight, bias, stride, padding, out_hw,
                                       ws or Workspace(), **fused)
    return nchw(y), (algo, conv, ctx)


def conv2d_backward(grad_y, ctx, weight, x_shape, stride, padding, input_grad=True, ws=None):
    """As reference.conv2d_backward, for any algorithm of conv2d_forward."""
    algo, conv, ctx = ctx
    convplan.note(conv, input_grad)
    n, c, h, w = x_shape
    gx, grad_w, grad_b = _ALGORITHMS[algo].backward(chwn(grad_y), ctx, weight, (c, h, w, n),
                                                    stride, padding, input_grad, ws or Workspace())
    return (None if gx is None else nchw(gx)), grad_w, grad_b


def trial(conv, input_grad):
    """run(name): one forward and backward of `conv` by algorithm `name` on random data made
    once, each algorithm with its own workspace as a layer has (convplan.decide times it)."""
    rng = np.random.default_rng(0)
    n, c, h, w = conv.x
    x = nchw(rng.standard_normal((c, h, w, n), np.float32).astype(conv.dtype))
    weight = rng.standard_normal(conv.weight, np.float32).astype(conv.dtype)
    bias = np.zeros(conv.weight[0], conv.dtype)
    spaces = {}

    def run(name):
        ws = spaces.setdefault(name, Workspace())
        y, ctx = conv2d_forward(x, weight, bias, conv.stride, conv.padding, ws, conv.pool,
                                conv.relu, algo=name)
        conv2d_backward(y, ctx, weight, x.shape, conv.stride, conv.padding, input_grad, ws)
    return run


def maxpool2d_forward(x, kernel, stride, relu=False):
    """As reference.maxpool2d_forward (ReLU'd too if `relu`); the result's ctx is the code."""
    if kernel[0] * kernel[1] > pool.CUT:      # the uint8 code of a window's maximum would wrap
        raise ValueError(f"max pooling windows of more than {pool.CUT} values ({kernel[0]}x"
                         f"{kernel[1]}) are beyond the numba kernels: use --kernels numpy")
    xc = chwn(x)
    out_hw = [out_size(size, k, s) for size, k, s in zip(xc.shape[1:3], kernel, stride)]
    y = arrays.empty((xc.shape[0], *out_hw, xc.shape[3]), x.dtype)
    code = arrays.empty(y.shape, np.uint8)
    pool.max_pool(xc, *kernel, *stride, relu, y, code)
    return nchw(y), code


def maxpool2d_backward(grad_y, code, x, kernel, stride):
    """As reference.maxpool2d_backward."""
    n, c, h, w = x.shape
    gx = arrays.zeros((c, h, w, n), grad_y.dtype)
    pool.max_pool_grad(chwn(grad_y), code, *kernel, *stride, gx)
    return nchw(gx)


def _flat(a):
    """a's elements in memory order as a 1-D view, or None unless a fills one contiguous block."""
    t = a.transpose(np.argsort(a.strides)[::-1])
    return t.reshape(-1) if t.flags.c_contiguous else None


def relu_forward(x):
    """As reference.relu_forward; the ctx is the output."""
    xf = _flat(x)
    if xf is None:
        return reference.relu_forward(x)
    y = arrays.empty_like(x)   # x's memory order, so the flat views line up
    pool.relu(xf, _flat(y))
    return y, y


def relu_backward(grad_y, ctx):
    """As reference.relu_backward, given the forward's ctx."""
    if ctx.dtype == bool:                  # the forward fell back to NumPy: ctx is its mask
        return reference.relu_backward(grad_y, ctx)
    if grad_y.strides != ctx.strides:      # laid out unlike the output: no common flat view
        return reference.relu_backward(grad_y, ctx > 0)
    gx = arrays.empty_like(ctx)
    pool.relu_grad(_flat(ctx), _flat(grad_y), _flat(gx))
    return gx


def _rows(a):
    """a (N, C, H, W) as (C, H*W*N) rows of (C, H, W, N) memory (a copy unless it is that)."""
    return chwn(a).reshape(a.shape[1], -1)


_NO_ROWS = {}   # dtype -> an empty (0, 0) array: the residual argument when there is none


def _none(dtype):
    return _NO_ROWS.setdefault(dtype, np.empty((0, 0), dtype))


def batchnorm2d_forward(x, weight, bias, eps, running=None, relu=False, residual=None,
                        average=False):
    """As reference.batchnorm2d_forward: the statistics (in training), the normalisation, the
    residual add, the ReLU and the global average pooling in one compiled pass over each
    channel's row; the pooled (N, C) is a view of (C, N) memory, as global_avgpool2d_forward's."""
    xr, dtype = _rows(x), x.dtype
    c, n = xr.shape[0], x.shape[0]
    added = residual is not None
    store = added or not average    # the residual's mask reads y back (normalize_grad)
    y = arrays.empty_like(xr) if store else _none(dtype)
    means = arrays.empty((c, n), dtype) if average else _none(dtype)
    res = _rows(residual) if added else _none(dtype)
    if running is None:
        mean, var = np.empty(c, dtype), np.empty(c, dtype)
    else:       # read, not written: the kernel sets them only from batch statistics
        mean, var = (v.astype(dtype, copy=False) for v in running)
    inv, scale, shift = np.empty(c, dtype), np.empty(c, dtype), np.empty(c, dtype)
    norm.batch_normalize(xr, weight.astype(dtype, copy=False), bias.astype(dtype, copy=False),
                         dtype.type(eps), res, added, relu, running is None, mean, var, inv,
                         scale, shift, store, y, average, means)
    shape = (c, x.shape[2], x.shape[3], n)
    out = means.T if average else nchw(y.reshape(shape))
    return out, (mean, var), (xr, mean, inv, scale, shift, y if added else _none(dtype), relu,
                              running is None, added, average, shape)


def batchnorm2d_backward(grad_y, ctx, weight):
    """As reference.batchnorm2d_backward, in one compiled pass per channel."""
    xr, mean, inv, scale, shift, y, relu, batch_stats, added, average, shape = ctx
    gx = arrays.empty_like(xr)
    gres = arrays.empty_like(xr) if added else _none(xr.dtype)
    gw, gb = np.empty(len(xr)), np.empty(len(xr))
    gy = np.ascontiguousarray(grad_y.T) if average else _rows(grad_y)
    norm.normalize_grad(gy, xr, mean, inv, scale, shift, y, relu, batch_stats, gres, added,
                        average, gw, gb, gx)
    return (nchw(gx.reshape(shape)), gw.astype(weight.dtype), gb.astype(weight.dtype),
            nchw(gres.reshape(shape)) if added else None)


def global_avgpool2d_forward(x):
    """As reference.global_avgpool2d_forward; y is an (N, C) view of (C, N) memory."""
    xc = chwn(x)
    y = arrays.empty((xc.shape[0], xc.shape[3]), x.dtype)
    norm.mean_over_pixels(xc.reshape(xc.shape[0], -1, xc.shape[3]), y)
    return y.T


def global_avgpool2d_backward(grad_y, x):
    """As reference.global_avgpool2d_backward, the result in (C, H, W, N) memory."""
    n, c, h, w = x.shape
    gx = arrays.empty((c, h * w, n), grad_y.dtype)
    norm.spread_over_pixels(np.ascontiguousarray(grad_y.T), gx)
    return nchw(gx.reshape(c, h, w, n))


# The same as the reference's: pooling by averages is rare, and allocation is NumPy's.
avgpool2d_forward, avgpool2d_backward = reference.avgpool2d_forward, reference.avgpool2d_backward
empty, zeros, array = reference.empty, reference.zeros, reference.array
cross_entropy = loss.cross_entropy
sgd, adam, rmsprop = optim.sgd, optim.adam, optim.rmsprop
round_bf16, sum_bf16 = bf16.round_bf16, bf16.sum_bf16


# --- fused layer groups ---------------------------------------------------------------------------
# `plan(layers)` is what a Sequential runs: its layers in order, except that each group below
# becomes one `Fused` step: a convolution followed by a 2x2 max pool (and a ReLU before or after
# the pool); a ReLU after a max pool, a batch normalisation or a residual block (or a ReLU before a
# max pool); global average pooling after a batch normalisation or a residual block that ends in
# one (and a ReLU between them). ReLU and max pooling commute, outputs and gradients alike (ties
# included), so both layer orders fuse. A residual block whose body ends in a batch normalisation
# adds its shortcut in that normalisation's pass (Residual.run), and its body is a Sequential,
# planned here like any other.
# A group only calls its layers' own kernels with their own parameters and caches: the module
# tree, `parameters()` and `state_dict()` do not change, and so neither does anything that reads
# them. Layers are known by the `op` their class declares ("conv2d", "maxpool2d", "relu", ...), not
# by importing them: ddl.nn imports the kernels, never the other way round.
class Fused:
    """One layer and what joins its pass: `layer.run(backend, x, **options)` computes both, and
    `layer.backward` their gradients. Options: pool=True (a Conv2d and the 2x2 max pool after
    it: the full-resolution output is never stored), relu=True (the ReLU after it, or between
    it and the pool or average), average=True (a BatchNorm2d, or a Residual that `fuses_tail`,
    and the global average pooling after it: the full-size output is never stored nor read
    back, nor its gradient spread over the pixels in memory)."""

    SUFFIXES = (("pool", " + max pool 2x2"), ("relu", " + ReLU"),
                ("average", " + global average pool"))

    def __init__(self, layer, **options):
        self.layer, self.options = layer, options

    def forward(self, x):
        return self.layer.run(_self, x, **self.options)

    def backward(self, grad_y):
        return self.layer.backward(grad_y)

    def __repr__(self):
        return repr(self.layer) + "".join(text for key, text in self.SUFFIXES
                                          if self.options.get(key))


# The ops of layers whose every pass here is compiled (or one BLAS call, or free): any other layer
# runs NumPy code, which `slow_steps` names.
COMPILED = {"conv2d", "maxpool2d", "relu", "batchnorm2d", "global_avgpool2d", "residual",
            "sequential", "linear", "flatten"}
# Ops whose layer takes run(backend, x, relu=True) for a ReLU after it.
TAKES_RELU = ("maxpool2d", "batchnorm2d", "residual")


def _op(layer):
    """The op that `layer`'s own class declares (None for a subclass that does not declare it
    again: it may run differently)."""
    return vars(type(layer)).get("op") if layer is not None else None


def _averages(layer):
    """Whether `layer` takes the global average pooling after it into its pass."""
    op = _op(layer)
    return op == "batchnorm2d" or (op == "residual" and layer.fuses_tail())


def plan(layers):
    """The steps that run `layers` (a list of modules) with fused groups where possible."""
    steps, i = [], 0
    while i < len(layers):
        a, b, c = (layers[i:i + 3] + [None, None])[:3]
        ops = (_op(a), _op(b), _op(c))
        if ops[:2] == ("conv2d", "maxpool2d") and fusable(a, b):
            relu = ops[2] == "relu"
            steps.append(Fused(a, pool=True, relu=relu))
            i += 3 if relu else 2
        elif ops == ("conv2d", "relu", "maxpool2d") and fusable(a, c):
            steps.append(Fused(a, pool=True, relu=True))
            i += 3
        elif _averages(a) and (ops[1] == "global_avgpool2d"
                               or ops[1:] == ("relu", "global_avgpool2d")):
            relu = ops[1] == "relu"
            steps.append(Fused(a, relu=relu, average=True))
            i += 3 if relu else 2
        elif ops[0] in TAKES_RELU and ops[1] == "relu":
            steps.append(Fused(a, relu=True))
            i += 2
        elif ops[:2] == ("relu", "maxpool2d"):
            steps.append(Fused(b, relu=True))
            i += 2
        else:
            steps.append(a)
            i += 1
    return steps


def slow_steps(module):
    """The names (state_dict prefixes, "" for `module` itself) of the layers in `module`'s tree
    that this backend runs through the NumPy reference: no compiled kernel of theirs."""
    return [name or "(the model)" for name, m in module.named_modules()
            if _op(m) not in COMPILED]


_self = sys.modules[__name__]   # this backend, which the fused groups run their layers with

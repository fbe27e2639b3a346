"""The layers: PyTorch's shapes, defaults and state_dict names, NCHW at every boundary.

Each layer caches in `forward` what its `backward` needs, so backward must follow the matching
forward. `backward` adds parameter gradients into `p.grad` in place (never rebinding it) and
returns the gradient of the input.
"""
import math

import numpy as np

from ddl import kernels
from ddl.kernels.arrays import Workspace, matmul_like, pair
from ddl.nn.module import Module, Parameter, Residual, Sequential, same_shape


def _uniform(rng, bound, shape):
    # Drawn in float64 and cast, so a seed gives the same weights whatever dtype is used later.
    return rng.uniform(-bound, bound, size=shape).astype(np.float32)


class Linear(Module):
    """y = x @ weight.T + bias; x (N, in_features) -> y (N, out_features).

    rng: np.random.Generator (or int seed; None -> fresh) drawing weight, then bias.
    """

    op = "linear"

    def __init__(self, in_features, out_features, bias=True, rng=None):
        super().__init__()
        rng = np.random.default_rng(rng)
        self.in_features, self.out_features = in_features, out_features
        # PyTorch's default init (kaiming_uniform with a=sqrt(5)) reduces to U(+-1/sqrt(fan_in)).
        bound = 1 / math.sqrt(in_features)
        self.weight = Parameter(_uniform(rng, bound, (out_features, in_features)))
        self.bias = Parameter(_uniform(rng, bound, (out_features,))) if bias else None

    def forward(self, x):
        if x.ndim != 2 or x.shape[1] != self.in_features:   # NumPy's matmul would say it obscurely
            raise ValueError(f"Linear takes (N, {self.in_features}) inputs, got "
                             f"{tuple(x.shape)}: give it in_features={x.shape[-1]}, or change "
                             f"the layers before it")
        self._x = x
        y = x @ self.weight.data.T
        if self.bias is not None:
            y += self.bias.data
        return y

    def backward(self, grad_y):
        self.weight.grad += grad_y.T @ self._x
        if self.bias is not None:
            self.bias.grad += grad_y.sum(axis=0)
        return matmul_like(grad_y, self.weight.data, self._x)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"


class Conv2d(Module):
    """2-D cross-correlation: x (N, C, H, W) -> (N, out_channels, OH, OW).

    kernel_size, stride, padding: int or (h, w). rng as for Linear. The output is an NCHW view
    of (C, H, W, N) memory (see ddl/kernels/numpy.py); NumPy treats it like any other array. NumPy
    kernels run im2col and one GEMM; compiled ones pick an algorithm from the shape.
    needs_input_grad (see Module): False skips the input gradient, a third of the backward work.
    """

    op = "conv2d"   # what a backend's plan knows it by

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True,
                 rng=None):
        super().__init__()
        rng = np.random.default_rng(rng)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = (pair(kernel_size), pair(stride),
                                                       pair(padding))
        kh, kw = self.kernel_size
        bound = 1 / math.sqrt(in_channels * kh * kw)
        self.weight = Parameter(_uniform(rng, bound, (out_channels, in_channels, kh, kw)))
        self.bias = Parameter(_uniform(rng, bound, (out_channels,))) if bias else None
        self._ws = Workspace()

    def forward(self, x):
        return self.run(kernels.get(), x)

    def run(self, backend, x, **fused):
        """forward with the kernels of `backend`; `fused` (pool=True, relu=...) asks the numba
        backend to max-pool 2x2 (and ReLU) in the same pass (its `plan`)."""
        self._x_shape, self._backend = x.shape, backend
        b = None if self.bias is None else self.bias.data
        y, self._ctx = backend.conv2d_forward(x, self.weight.data, b, self.stride, self.padding,
                                              self._ws, **fused)
        return y

    def backward(self, grad_y):
        gx, gw, gb = self._backend.conv2d_backward(
            grad_y, self._ctx, self.weight.data, self._x_shape, self.stride, self.padding,
            self.needs_input_grad, self._ws)
        self.weight.grad += gw
        if self.bias is not None:
            self.bias.grad += gb
        return gx

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}")


class _Pool2d(Module):
    def __init__(self, kernel_size, stride=None):
        super().__init__()
        self.kernel_size = pair(kernel_size)
        self.stride = self.kernel_size if stride is None else pair(stride)

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}"


class MaxPool2d(_Pool2d):
    """Max over each window: (N, C, H, W) -> (N, C, OH, OW); gradient to the first maximum only."""

    op = "maxpool2d"

    def forward(self, x):
        return self.run(kernels.get(), x)

    def run(self, backend, x, relu=False):
        """forward with the kernels of `backend`, followed by ReLU when `relu` (both backends)."""
        self._x, self._backend = x, backend
        y, self._ctx = backend.maxpool2d_forward(x, self.kernel_size, self.stride, relu)
        return y

    def backward(self, grad_y):
        return self._backend.maxpool2d_backward(grad_y, self._ctx, self._x, self.kernel_size,
                                                self.stride)


class AvgPool2d(_Pool2d):
    """Mean over each window: (N, C, H, W) -> (N, C, OH, OW)."""

    def forward(self, x):
        self._x, self._backend = x, kernels.get()
        return self._backend.avgpool2d_forward(x, self.kernel_size, self.stride)

    def backward(self, grad_y):
        return self._backend.avgpool2d_backward(grad_y, self._x, self.kernel_size, self.stride)


class GlobalAvgPool2d(Module):
    """The mean of each channel over the whole image: (N, C, H, W) -> (N, C), what a classifier
    head reads whatever the image size (PyTorch: AdaptiveAvgPool2d(1) and Flatten)."""

    op = "global_avgpool2d"

    def forward(self, x):
        self._x, self._backend = x, kernels.get()
        return self._backend.global_avgpool2d_forward(x)

    def backward(self, grad_y):
        return self._backend.global_avgpool2d_backward(grad_y, self._x)


class ReLU(Module):
    op = "relu"

    def forward(self, x):
        self._backend = kernels.get()
        y, self._ctx = self._backend.relu_forward(x)
        return y

    def backward(self, grad_y):
        return self._backend.relu_backward(grad_y, self._ctx)


class LeakyReLU(Module):
    def __init__(self, negative_slope=0.01):
        super().__init__()
        self.negative_slope = negative_slope

    def forward(self, x):
        # The slope as an array of x's dtype, so float32 stays float32 under NumPy 2 promotion.
        self._slope = np.where(x > 0, x.dtype.type(1), x.dtype.type(self.negative_slope))
        return x * self._slope

    def backward(self, grad_y):
        return grad_y * self._slope

    def extra_repr(self):
        return f"negative_slope={self.negative_slope}"


class Tanh(Module):
    def forward(self, x):
        self._y = np.tanh(x)
        return self._y

    def backward(self, grad_y):
        return grad_y * (1 - self._y * self._y)


class Sigmoid(Module):
    def forward(self, x):
        # Via tanh: no overflow warning from exp(-x) for very negative x.
        self._y = 0.5 * (1 + np.tanh(0.5 * x))
        return self._y

    def backward(self, grad_y):
        return grad_y * self._y * (1 - self._y)


class Flatten(Module):
    """(N, ...) -> (N, prod(...))."""

    op = "flatten"

    def forward(self, x):
        self._x_shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, grad_y):
        return grad_y.reshape(self._x_shape)


class Dropout(Module):
    """Inverted dropout: in training zero each element with probability p and scale the rest by
    1/(1-p), so evaluation is the identity. Masks come from `self.rng`, which the trainer reseeds
    from (seed, epoch, rank) every epoch."""

    def __init__(self, p=0.5, rng=None):
        super().__init__()
        if not 0 <= p <= 1:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = p
        self.rng = np.random.default_rng(rng)  # a Generator passes through unchanged
        self._mask = None

    def forward(self, x):
        if not self.training or self.p == 0:
            self._mask = None
            return x
        # float32 uniforms whatever x's dtype: half the cost, and the mask does not depend on dtype.
        keep = self.rng.random(x.shape, dtype=np.float32) >= self.p
        scale = 0.0 if self.p == 1 else 1 / (1 - self.p)
        self._mask = keep * x.dtype.type(scale)
        return x * self._mask

    def backward(self, grad_y):
        return grad_y if self._mask is None else grad_y * self._mask

    def extra_repr(self):
        return f"p={self.p}"


class BatchNorm2d(Module):
    """Per-channel normalisation of (N, C, H, W).

    Training: statistics of the current batch over (N, H, W); running stats are updated
    (running_var with the unbiased variance, as PyTorch) but never used. Eval: running stats only.
    """

    op = "batchnorm2d"

    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = Parameter(np.ones(num_features))
        self.bias = Parameter(np.zeros(num_features))
        self.register_buffer("running_mean", np.zeros(num_features, dtype=np.float32))
        self.register_buffer("running_var", np.ones(num_features, dtype=np.float32))
        self.register_buffer("num_batches_tracked", np.array(0, dtype=np.int64))

    def forward(self, x):
        return self.run(kernels.get(), x)

    def run(self, backend, x, relu=False, residual=None, average=False):
        """forward with the kernels of `backend`, plus `residual` (like the output), then ReLU,
        then global average pooling ((N, C) out) when asked: the tail of a residual block, or of
        a network, in one pass (Residual.run and a backend's plan ask)."""
        if residual is not None:
            same_shape(x, residual)     # the kernels would read past a smaller one
        self._backend = backend
        running = None if self.training else (self.running_mean, self.running_var)
        y, (mean, var), self._ctx = backend.batchnorm2d_forward(
            x, self.weight.data, self.bias.data, self.eps, running, relu, residual, average)
        if self.training:
            n = x.size // x.shape[1]
            m = self.momentum
            # In place: buffers may be views the data-parallel wrapper keeps in sync.
            self.running_mean *= 1 - m
            self.running_mean += m * mean
            self.running_var *= 1 - m
            self.running_var += m * var * (n / max(n - 1, 1))
            self.num_batches_tracked += 1
        return y

    def backward(self, grad_y):
        """The input's gradient; the residual's, when the forward added one, is left in
        `residual_grad` for the Residual that asked."""
        gx, gw, gb, self.residual_grad = self._backend.batchnorm2d_backward(
            grad_y, self._ctx, self.weight.data)
        self.weight.grad += gw
        self.bias.grad += gb
        return gx

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


class ResidualBlock(Residual):
    """ResNet's basic block without its final ReLU: y = f(x) + shortcut(x), f being a 3x3
    convolution (with `stride`), BatchNorm2d, ReLU, a 3x3 convolution and BatchNorm2d, and the
    shortcut the identity, or a 1x1 convolution (with `stride`) and BatchNorm2d where the shape
    changes. (N, in_channels, H, W) -> (N, out_channels, OH, OW), OH = ceil(H / stride). The
    convolutions have no bias: the BatchNorm2d after each has one. rng as for Linear."""

    op = Residual.op    # runs as any Residual

    def __init__(self, in_channels, out_channels, stride=1, rng=None):
        rng = np.random.default_rng(rng)
        body = Sequential(Conv2d(in_channels, out_channels, 3, stride, 1, bias=False, rng=rng),
                          BatchNorm2d(out_channels), ReLU(),
                          Conv2d(out_channels, out_channels, 3, 1, 1, bias=False, rng=rng),
                          BatchNorm2d(out_channels))
        shortcut = None
        if stride != 1 or in_channels != out_channels:
            shortcut = Sequential(Conv2d(in_channels, out_channels, 1, stride, bias=False, rng=rng),
                                  BatchNorm2d(out_channels))
        super().__init__(body, shortcut)

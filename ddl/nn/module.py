"""The module paradigm: Parameter, Module, and the containers Sequential and Residual.

A Parameter holds `data` and `grad` side by side. Both arrays are written in place, never rebound
(outside `Module.to`): the data-parallel wrapper turns every `grad` into a view of one flat buffer,
so a layer that did `p.grad = g` would silently drop out of the all-reduce.
"""
from collections import OrderedDict

import numpy as np

from ddl import kernels


class Parameter:
    """A trainable array: `data` and its gradient `grad`, same shape and dtype, in C order (the
    optimizers' update rules work on flat views), allocated by the backend in use."""

    def __init__(self, data, dtype=np.float32):
        backend = kernels.get()     # its arrays live where its kernels run
        self.data = backend.array(data, dtype)
        self.grad = backend.zeros(self.data.shape, self.data.dtype)

    @property
    def shape(self):
        return self.data.shape

    def __repr__(self):
        return f"Parameter(shape={self.shape}, dtype={self.data.dtype})"


class Module:
    """Base class. Subclasses implement `forward(x)` and `backward(grad_y)`.

    `backward` adds the parameter gradients into each `p.grad` (they accumulate until `zero_grad`)
    and returns the gradient with respect to the input of the last `forward`. Parameters, buffers
    (non-trainable state such as running statistics) and child modules are found from the
    attributes, in the order they were assigned, so `parameters()` has the same order everywhere.
    """

    training = True
    # False when nothing consumes the gradient with respect to the input (the first layer of a
    # training loop): a layer that can skip that work (Conv2d) then returns None from backward.
    needs_input_grad = True

    def __init__(self):
        self._buffer_names = []

    # --- the blog post's contract -------------------------------------------------------------
    def forward(self, x):
        raise NotImplementedError

    def backward(self, grad_y):
        raise NotImplementedError

    def step(self, optimizer):
        """One optimisation step on this module's own parameters."""
        optimizer.step(self.parameters())

    def __call__(self, x):
        return self.forward(x)

    # --- structure -----------------------------------------------------------------------------
    def register_buffer(self, name, value):
        """Non-trainable state that belongs in `state_dict` (e.g. BatchNorm running mean)."""
        if not hasattr(self, "_buffer_names"):
            self._buffer_names = []
        setattr(self, name, value)
        if name not in self._buffer_names:
            self._buffer_names.append(name)

    def named_children(self):
        return [(k, v) for k, v in vars(self).items() if isinstance(v, Module)]

    def named_modules(self, prefix=""):
        """(name, module) for this module (named `prefix`, "" at the top) and every descendant,
        depth first, parents before children; names are state_dict's prefixes ("3.body.0")."""
        out = [(prefix, self)]
        for name, child in self.named_children():
            out.extend(child.named_modules(f"{prefix}.{name}" if prefix else name))
        return out

    def modules(self):
        """This module and every descendant, depth first, parents before children."""
        return [m for _, m in self.named_modules()]

    def named_parameters(self, prefix=""):
        own = [(prefix + k, v) for k, v in vars(self).items() if isinstance(v, Parameter)]
        for name, child in self.named_children():
            own.extend(child.named_parameters(f"{prefix}{name}."))
        return own

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def named_buffers(self, prefix=""):
        own = [(prefix + k, getattr(self, k)) for k in getattr(self, "_buffer_names", [])]
        for name, child in self.named_children():
            own.extend(child.named_buffers(f"{prefix}{name}."))
        return own

    def add_hook(self, hook):
        """Call `hook(module, direction, output)` after every forward ("forward") and backward
        ("backward") of this module and of each descendant; what the hook raises ends the pass.
        The hook wraps each instance's own methods, so it sees the calls that a parent (or a
        user's module) makes directly too. A layer with a `run` method (Conv2d, MaxPool2d) is
        hooked there instead of in forward: its forward calls run, and so do the fused groups
        of the numba backend's plan, which never call the pool's or the ReLU's forward."""
        for m in self.modules():
            for method, direction in (("run" if hasattr(m, "run") else "forward", "forward"),
                                      ("backward", "backward")):
                setattr(m, method, _hooked(getattr(m, method), m, direction, hook))

    # --- habits borrowed from PyTorch -----------------------------------------------------------
    def zero_grad(self):
        for p in self.parameters():
            p.grad[...] = 0

    def train(self, mode=True):
        for m in self.modules():
            m.training = mode
        return self

    def eval(self):
        return self.train(False)

    def to(self, dtype):
        """Cast parameters and floating buffers (e.g. to float64 for gradient checks)."""
        for p in self.parameters():
            p.data = p.data.astype(dtype)
            p.grad = p.grad.astype(dtype)
        for m in self.modules():
            for k in getattr(m, "_buffer_names", []):
                v = getattr(m, k)
                if np.issubdtype(v.dtype, np.floating):
                    setattr(m, k, v.astype(dtype))
        return self

    def state_dict(self):
        """Ordered name -> array copy; names and shapes follow PyTorch's for the same layers."""
        entries = self.named_parameters()
        out = OrderedDict((k, p.data.copy()) for k, p in entries)
        out.update((k, np.array(v, copy=True)) for k, v in self.named_buffers())
        return out

    def load_state_dict(self, state):
        """Copy arrays in place; every missing, unexpected or mis-shaped key is named in one
        error."""
        targets = {k: p.data for k, p in self.named_parameters()}
        targets.update(self.named_buffers())
        missing = [k for k in targets if k not in state]
        unexpected = [k for k in state if k not in targets]
        shaped = [f"{k} (expected {targets[k].shape}, got {np.shape(state[k])})"
                  for k in targets if k in state and np.shape(state[k]) != targets[k].shape]
        problems = [f"{label}: {', '.join(keys)}" for label, keys in
                    (("missing keys", missing), ("unexpected keys", unexpected),
                     ("wrong shapes", shaped)) if keys]
        if problems:
            raise KeyError(f"{type(self).__name__}.load_state_dict: " + "; ".join(problems))
        for k, dst in targets.items():
            dst[...] = state[k]

    def extra_repr(self):
        return ""

    def summary(self, in_shape):
        """A table of the layers: each one's output shape for one image of `in_shape` (C, H, W)
        and its parameters, and the totals (ddl/nn/summary.py); `print` it."""
        from ddl.nn.summary import summary
        return summary(self, tuple(in_shape))

    def __repr__(self):
        children = self.named_children()
        if not children:
            return f"{type(self).__name__}({self.extra_repr()})"
        body = "\n".join(f"  ({k}): " + repr(v).replace("\n", "\n  ") for k, v in children)
        return f"{type(self).__name__}(\n{body}\n)"


def _hooked(method, module, direction, hook):
    def call(*args, **kwargs):
        out = method(*args, **kwargs)
        hook(module, direction, out)
        return out
    return call


class Sequential(Module):
    """Modules applied in order; backward runs them in reverse; step steps each trainable child.

    With the numba backend, neighbours that fuse (a convolution, its max pool and ReLU) run as
    one step (its `plan`); backward follows the steps of the last forward.
    """

    op = "sequential"

    def __init__(self, *modules):
        super().__init__()
        for i, m in enumerate(modules):
            setattr(self, str(i), m)
        self._plan = (None, [])     # (what it was made for, the steps)

    def __iter__(self):
        return iter(m for _, m in self.named_children())

    def __len__(self):
        return len(self.named_children())

    def __getitem__(self, i):
        return list(self)[i]

    # The first layer receives the container's input, and so decides what its gradient costs.
    @property
    def needs_input_grad(self):
        return self[0].needs_input_grad if len(self) else True

    @needs_input_grad.setter
    def needs_input_grad(self, needed):
        if len(self):
            self[0].needs_input_grad = needed

    def steps(self):
        """The layers as the backend in use runs them (its `plan`: fused groups with numba)."""
        layers, backend = list(self), kernels.get()
        key = (backend.name, [id(m) for m in layers])
        if self._plan[0] != key:
            self._plan = (key, backend.plan(layers))
        return self._plan[1]

    def forward(self, x):
        return self.run(kernels.get(), x)

    def run(self, backend, x, **fused):
        """forward, the last step run with `fused` (Residual.run's residual and relu) when given:
        only a last step that `fuses_tail` takes them is ever given them."""
        self._steps = self.steps()
        last = len(self._steps) - 1 if fused else len(self._steps)
        for m in self._steps[:last]:
            x = m.forward(x)
        return self._steps[last].run(backend, x, **fused) if fused else x

    def fuses_tail(self):
        """Whether the last step takes a residual to add, a ReLU and global average pooling
        (`run(backend, x, residual=, relu=, average=)`): a BatchNorm2d does."""
        steps = self.steps()
        return bool(steps) and vars(type(steps[-1])).get("op") == "batchnorm2d"

    # Called with each step (layer or fused group) once its backward is done, when set: lets
    # the trainer exchange finished gradients while backward goes on (Replicas.overlapping).
    after_step = None

    def backward(self, grad_y):
        for m in reversed(self._steps):
            grad_y = m.backward(grad_y)
            if self.after_step is not None:
                self.after_step(m)
        return grad_y

    def step(self, optimizer):
        """Each child steps its own parameters; when none does anything else, in one call of the
        optimizer, which then updates a flat buffer's parameters in one pass."""
        if _steps_plainly(self):
            optimizer.step(self.parameters())
            return
        for m in self:
            m.step(optimizer)


def _steps_plainly(module):
    """Whether `module.step(optimizer)` amounts to `optimizer.step(module.parameters())`."""
    own = type(module).step
    return own is Module.step or (own is Sequential.step and all(map(_steps_plainly, module)))


class Residual(Module):
    """y = body(x) + shortcut(x), the shortcut being the identity when None (He et al.'s residual
    connection). `body` and `shortcut` are modules, usually Sequentials, whose outputs have one
    shape: a body that changes the shape (a strided convolution, more channels) needs a shortcut
    that changes it alike (a strided 1x1 Conv2d and a BatchNorm2d, say). Backward adds the input
    gradients of the two paths."""

    op = "residual"     # what a backend's plan knows it by

    def __init__(self, body, shortcut=None):
        super().__init__()
        self.body, self.shortcut = body, shortcut

    def forward(self, x):
        return self.run(kernels.get(), x)

    def fuses_tail(self):
        """Whether the body's last step adds the shortcut (and applies a ReLU, and global
        average pooling, after the block) in its own pass: a BatchNorm2d does."""
        return isinstance(self.body, Sequential) and self.body.fuses_tail()

    def run(self, backend, x, relu=False, average=False):
        """forward with the kernels of `backend`, followed by ReLU when `relu` (a backend's plan
        asks, for a ReLU after the block). A body whose last step is a BatchNorm2d adds the
        shortcut (and applies the ReLU) in that step's own pass, not in passes of their own, and
        global average pooling after the block too when the plan asks (`average`: only of a
        block that `fuses_tail`)."""
        skip = x if self.shortcut is None else self.shortcut.forward(x)
        self._fused, self._relu = self.fuses_tail(), None
        if self._fused:
            return self.body.run(backend, x, residual=skip, relu=relu, average=average)
        if average:
            raise ValueError("Residual: average pooling fuses only into a body ending in a "
                             "BatchNorm2d")
        y = self.body.forward(x)
        same_shape(y, skip)
        y = y + skip
        if relu:
            self._relu = backend
            y, self._relu_ctx = backend.relu_forward(y)
        return y

    def backward(self, grad_y):
        if self._relu is not None:
            grad_y = self._relu.relu_backward(grad_y, self._relu_ctx)
        grad_x = self.body.backward(grad_y)
        if self._fused:
            grad_y = self.body[-1].residual_grad
        skip = grad_y if self.shortcut is None else self.shortcut.backward(grad_y)
        return grad_x + skip


def same_shape(y, skip):
    """ValueError unless a residual block's body output `y` and shortcut `skip` match."""
    if y.shape != skip.shape:   # NumPy would broadcast some mismatches without a word
        raise ValueError(f"Residual: the body gives {y.shape}, the shortcut {skip.shape}")

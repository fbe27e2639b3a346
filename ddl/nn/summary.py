"""A model layer by layer: each layer's output shape and parameter count for one image (Keras's
`summary()`, torchinfo), and the layer where a forward pass fails, with the shape it got.

Both run the model with NumPy's kernels, whose plan keeps the layers apart (the numba backend's
fuses a convolution with its pool), in eval mode on blank images.
"""
import contextlib

import numpy as np

from ddl import kernels
from ddl.errors import dims


def _count(module):
    return sum(p.data.size for p in module.parameters())


def _own(module):
    """The parameters of `module` itself, not its children's."""
    return _count(module) - sum(_count(child) for _, child in module.named_children())


@contextlib.contextmanager
def _traced(model, rows):
    """Within the block, every forward of `model`'s modules appends [name, module, output shape]
    to `rows` (parents before children), and an exception raised in a forward carries
    `ddl_layer`, (name, module, input shape) of the innermost module it came from."""
    def wrap(name, module, forward):
        def traced(*args, **kwargs):            # forward(x), or run(backend, x, ...)
            x = args[-1]
            row = [name, module, None]
            rows.append(row)
            try:
                y = forward(*args, **kwargs)
            except Exception as e:
                if not hasattr(e, "ddl_layer"):
                    e.ddl_layer = (name, module, tuple(np.shape(x)))
                raise
            row[2] = tuple(np.shape(y))
            return y
        return traced

    # Each module once, under its first name: a layer used twice (refused later, by name) must
    # not be wrapped twice. A module with a `run` method is traced there, as Module.add_hook
    # hooks it: its forward calls run, and so do the containers and fused steps around it.
    modules = list({id(m): (name, m) for name, m in reversed(model.named_modules())}.values())
    methods = [(m, "run" if hasattr(m, "run") else "forward") for _, m in modules]
    for (name, module), (_, method) in zip(modules, methods):
        setattr(module, method, wrap(name, module, getattr(module, method)))
    try:
        with kernels.using("numpy"):
            yield
    finally:
        for module, method in methods:
            delattr(module, method)


def trace(model, in_shape, batch=2):
    """[(name, module, output shape per image)] of `model` on `batch` blank images `in_shape`
    (C, H, W), parents before children. An exception of a layer carries `ddl_layer` (see
    `_traced`); the model is left in training mode."""
    rows = []
    try:
        with _traced(model, rows):
            model.eval().forward(np.zeros((batch, *in_shape), np.float32))
    finally:
        model.train()
    return [(name, module, shape[1:]) for name, module, shape in rows]


def where(e):
    """Where exception `e` of a traced forward arose, in words ("layer 3 Linear(2048, 10, ...)
    got input (2, 1568)"), or "" if not in a layer."""
    if not hasattr(e, "ddl_layer"):
        return ""
    name, module, shape = e.ddl_layer
    return f"layer {name or '(the model)'} {_short(module)} got input of shape {shape}"


def _short(module):
    return f"{type(module).__name__}({module.extra_repr()})"


def summary(model, in_shape):
    """The table of `model` on images `in_shape` (C, H, W): each layer, indented by its depth,
    its output shape for one image and its own parameters; then the totals."""
    rows = trace(model, in_shape)
    table = [("layer", "output shape", "parameters")]
    for name, module, shape in rows[1:] if len(rows) > 1 else rows:
        depth = name.count(".")
        table.append(("  " * depth + f"{name.rsplit('.', 1)[-1]}: {_short(module)}",
                      dims(shape) if shape else "-", f"{_own(module):,}"))
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    lines = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}" for a, b, c in table]
    lines.insert(1, "-" * len(lines[0]))
    total = _count(model)
    lines += ["-" * len(lines[0]),
              f"input {dims(in_shape)}, output {dims(rows[0][2])}: {total:,} parameters "
              f"({4 * total / 2**20:.2f} MiB as float32)"]
    return "\n".join(lines)

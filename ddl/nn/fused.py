"""Fused layer groups: neighbouring layers that the compiled kernels run in one pass.

`plan(layers)` is what a Sequential runs: its layers in order, except that a Conv2d followed by a
2x2 MaxPool2d (and a ReLU before or after the pool) becomes one `ConvPool` step, and a MaxPool2d
next to a ReLU becomes one `PoolReLU` step. ReLU and max pooling commute, outputs and gradients
alike (ties included), so both layer orders fuse. A group only calls its layers' own kernels with
their own parameters and caches: the module tree, `parameters()` and `state_dict()` do not change,
and so neither does anything that reads them. The NumPy kernels, the reference, never fuse.
"""
from ddl.kernels import compiled
from ddl.nn.layers import Conv2d, MaxPool2d, ReLU


class ConvPool:
    """Conv2d -> MaxPool2d(2) [-> ReLU], or Conv2d -> ReLU -> MaxPool2d(2): one pass that never
    stores the convolution's full-resolution output."""

    def __init__(self, conv, relu):
        self.conv, self.relu = conv, relu

    def forward(self, x):
        return self.conv.run(compiled, x, pool=True, relu=self.relu)

    def backward(self, grad_y):
        return self.conv.backward(grad_y)

    def __repr__(self):
        return f"{self.conv!r} + max pool 2x2" + (" + ReLU" if self.relu else "")


class PoolReLU:
    """MaxPool2d and ReLU, in either order: one pass."""

    def __init__(self, pool):
        self.pool = pool

    def forward(self, x):
        return self.pool.run(compiled, x, relu=True)

    def backward(self, grad_y):
        return self.pool.backward(grad_y)

    def __repr__(self):
        return f"{self.pool!r} + ReLU"


def plan(layers):
    """The steps that run `layers` (a list of modules) with fused groups where possible."""
    steps, i = [], 0
    while i < len(layers):
        a, b, c = (layers[i:i + 3] + [None, None])[:3]
        kinds = (type(a), type(b), type(c))
        if kinds[:2] == (Conv2d, MaxPool2d) and compiled.fusable(a, b):
            relu = kinds[2] is ReLU
            steps.append(ConvPool(a, relu))
            i += 3 if relu else 2
        elif kinds == (Conv2d, ReLU, MaxPool2d) and compiled.fusable(a, c):
            steps.append(ConvPool(a, True))
            i += 3
        elif kinds[:2] in ((MaxPool2d, ReLU), (ReLU, MaxPool2d)):
            steps.append(PoolReLU(a if kinds[0] is MaxPool2d else b))
            i += 2
        else:
            steps.append(a)
            i += 1
    return steps

"""Named models for MNIST: input (N, 1, 28, 28) float32, output logits (N, 10).

Layer indices in Sequential match the equivalent PyTorch nn.Sequential, so state_dict keys
("0.weight", "3.bias", ...) line up with a PyTorch model built the same way.
"""
import numpy as np

from ddl import nn


def _seed_cnn(rng):
    # 28 -conv5-> 24 -pool-> 12 -conv5-> 8 -pool-> 4: 20 * 4 * 4 = 320 features
    return nn.Sequential(
        nn.Conv2d(1, 10, 5, rng=rng), nn.MaxPool2d(2), nn.ReLU(),
        nn.Conv2d(10, 20, 5, rng=rng), nn.MaxPool2d(2), nn.ReLU(),
        nn.Flatten(), nn.Linear(320, 120, rng=rng), nn.ReLU(), nn.Linear(120, 10, rng=rng))


def _ref_cnn(rng):
    # 28 -conv3-> 26 -pool-> 13 -conv3-> 11 -pool-> 5: 64 * 5 * 5 = 1600 features.
    # Written Conv -> ReLU -> MaxPool, built Conv -> MaxPool -> ReLU: ReLU is monotone, so both
    # orders give the same outputs and gradients (tested), and ReLU then reads an array 4x smaller.
    # The layers keep their indices, so state_dict keys match PyTorch's model either way.
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, rng=rng), nn.MaxPool2d(2), nn.ReLU(),
        nn.Conv2d(32, 64, 3, rng=rng), nn.MaxPool2d(2), nn.ReLU(),
        nn.Flatten(), nn.Linear(1600, 128, rng=rng), nn.ReLU(), nn.Linear(128, 10, rng=rng))


def _mlp(rng):
    """Tiny and fast: for tests of the machinery rather than of learning."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 128, rng=rng), nn.ReLU(),
                         nn.Linear(128, 10, rng=rng))


_BUILDERS = {"seed-cnn": _seed_cnn, "ref-cnn": _ref_cnn, "mlp": _mlp}
MODELS = tuple(_BUILDERS)
DEFAULT_MODEL = "seed-cnn"
IMAGE_SHAPE, NUM_CLASSES = (1, 28, 28), 10     # what every named model takes and gives


def build(name, seed=0, input_grad=True):
    """A freshly initialised model; the same (name, seed) gives the same weights.

    input_grad=False tells the first layer that nothing consumes the gradient with respect to the
    images (true of a training loop), so its backward may skip it and return None: for a first
    convolution that is a whole GEMM and scatter per step.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    model = _BUILDERS[name](np.random.default_rng(seed))
    model[0].needs_input_grad = input_grad
    return model


def to_torch(model):
    """The torch.nn.Sequential of the same layers with the same weights (torch imported here only:
    the benchmark and the parity tests compare against it). Conv2d, Linear, MaxPool2d, ReLU and
    Flatten, which is what the named models use."""
    import torch
    twins = {
        nn.Conv2d: lambda m: torch.nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size,
                                             m.stride, m.padding, bias=m.bias is not None),
        nn.Linear: lambda m: torch.nn.Linear(m.in_features, m.out_features, m.bias is not None),
        nn.MaxPool2d: lambda m: torch.nn.MaxPool2d(m.kernel_size, m.stride),
        nn.ReLU: lambda m: torch.nn.ReLU(),
        nn.Flatten: lambda m: torch.nn.Flatten(),
    }
    twin = torch.nn.Sequential(*(twins[type(m)](m) for m in model))
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})
    return twin

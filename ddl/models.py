"""Models built for the data: images (N, C, H, W) float32 of any shape in, logits (N, K) out.

`build(name, in_shape, num_classes, seed)` makes a named model (a key of MODELS) or a user's:
`name` is then a reference `path/to/file.py:function`, and `function(in_shape, num_classes)`
(given `seed=` too if it takes a `seed` parameter) returns an nn.Module. The named models'
Sequential indices match the equivalent PyTorch nn.Sequential, so state_dict keys ("0.weight",
"3.bias", ...) line up with a PyTorch model built the same way (`to_torch`); for 1x28x28 images
of 10 classes the seeded weights are what they were when the models took MNIST only.
"""
import functools
import hashlib
import importlib.util
import inspect
import os
import sys

import numpy as np

from ddl import nn
from ddl.errors import ModelError, dims, one_line
from ddl.kernels.arrays import out_size
from ddl.nn.summary import trace, where


def _side(size, *layers):
    """One side of the image after `layers`, each the (kernel, stride, padding) of a conv or pool;
    ValueError if it vanishes."""
    for kernel, stride, padding in layers:
        size = out_size(size, kernel, stride, padding)
    return size


def _two_convs(in_shape, num_classes, rng, kernel, channels, hidden):
    """Conv(kernel), max pool 2, ReLU, twice (stride 1, no padding), then a hidden Linear layer.
    ref-cnn was written Conv -> ReLU -> MaxPool, and is built Conv -> MaxPool -> ReLU: ReLU is
    monotone, so both orders give the same outputs and gradients (tested), and the layers keep
    their indices, so state_dict keys match PyTorch's model either way."""
    (c, h, w), (c1, c2) = in_shape, channels
    trunk = ((kernel, 1, 0), (2, 2, 0)) * 2
    return nn.Sequential(
        nn.Conv2d(c, c1, kernel, rng=rng), nn.MaxPool2d(2), nn.ReLU(),
        nn.Conv2d(c1, c2, kernel, rng=rng), nn.MaxPool2d(2), nn.ReLU(),
        nn.Flatten(), nn.Linear(c2 * _side(h, *trunk) * _side(w, *trunk), hidden, rng=rng),
        nn.ReLU(), nn.Linear(hidden, num_classes, rng=rng))


def _mlp(in_shape, num_classes, rng):
    """Tiny and fast: for tests of the machinery rather than of learning."""
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(in_shape)), 128, rng=rng), nn.ReLU(),
                         nn.Linear(128, num_classes, rng=rng))


def _resnet_mini(in_shape, num_classes, rng):
    """A 3x3 stem of 16 channels, three stages of residual blocks (16, 32 and 64 channels, the
    last two halving the image), global average pooling and a linear classifier: any image size
    from 1x1 up."""
    layers = [nn.Conv2d(in_shape[0], 16, 3, padding=1, bias=False, rng=rng), nn.BatchNorm2d(16),
              nn.ReLU()]
    channels = 16
    for width, stride in ((16, 1), (32, 2), (64, 2)):
        layers += [nn.ResidualBlock(channels, width, stride, rng=rng), nn.ReLU()]
        channels = width
    layers += [nn.GlobalAvgPool2d(), nn.Linear(channels, num_classes, rng=rng)]
    return nn.Sequential(*layers)


def _vgg_mini(in_shape, num_classes, rng):
    """A VGG-style net as users write them, for 3x32x32 images (any size from 3x3 up): 3x3
    convolutions, one of stride 2, a 1x1 convolution, each followed by BatchNorm2d and ReLU, then
    global average pooling and a linear classifier."""
    layers, channels = [], in_shape[0]
    for width, kernel, stride in ((32, 3, 1), (32, 3, 1), (64, 3, 2), (64, 3, 1), (128, 1, 1)):
        layers += [nn.Conv2d(channels, width, kernel, stride, kernel // 2, bias=False, rng=rng),
                   nn.BatchNorm2d(width), nn.ReLU()]
        channels = width
    layers += [nn.GlobalAvgPool2d(), nn.Linear(channels, num_classes, rng=rng)]
    return nn.Sequential(*layers)


# name -> builder(in_shape, num_classes, rng): a new named model is one line here.
# (28x28 images leave seed-cnn 20 channels of 4x4, 320 features, and ref-cnn 64 of 5x5, 1600.)
MODELS = {"seed-cnn": functools.partial(_two_convs, kernel=5, channels=(10, 20), hidden=120),
          "ref-cnn": functools.partial(_two_convs, kernel=3, channels=(32, 64), hidden=128),
          "mlp": _mlp, "resnet-mini": _resnet_mini, "vgg-mini": _vgg_mini}
DEFAULT_MODEL = "seed-cnn"


def _split(name):
    """(path, function) of a model file reference "path.py:function", or None for other names."""
    path, colon, function = name.rpartition(":")
    if not colon and not name.endswith(".py"):
        return None
    if not (colon and path.endswith(".py") and function.isidentifier()):
        raise ModelError(f"model {name!r}: name a model file and its function as "
                         f"FILE.py:FUNCTION, e.g. models/net.py:make_model")
    return path, function


def check_name(name):
    """ModelError unless `name` is a named model or a well-formed file reference (no I/O)."""
    if name not in MODELS and _split(name) is None:
        raise ModelError(f"unknown model {name!r} (choose from {', '.join(MODELS)}, or give "
                         f"FILE.py:FUNCTION)")


def model_file(name):
    """The path of model file reference `name` ("path.py:function"), or None for a named model."""
    check_name(name)
    return None if name in MODELS else _split(name)[0]


def model_inputs(name):
    """[("--model", path)] for a model file, which no output may replace; [] for a named model
    or none."""
    path = name and model_file(name)
    return [("--model", path)] if path else []


def source_digest(name):
    """The SHA-256 (hex) of model file `name`'s source, which a checkpoint records so that a
    changed file is named as such; None for a named model or a file that cannot be read."""
    path = model_file(name)
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except (OSError, TypeError):
        return None


def trusted(name, given, trust, checkpoint):
    """The model to rebuild checkpoint `checkpoint`'s, which names model `name`: `given` (the
    user's --model) if any, else `name` if it is a named model or the user trusts the checkpoint
    (--trust-model). A checkpoint is data: the model file it names runs only when the user names
    it or confirms it, else ModelError saying how."""
    if given:
        return resolve(given)
    if name in MODELS or trust:
        return name
    raise ModelError(f"{checkpoint} was saved from the model file {model_file(name)}, and a "
                     f"checkpoint does not choose the code that ddl runs: if you trust that file, "
                     f"pass --model {name} (or --trust-model)")


def changed_file(architecture):
    """The model file of a checkpoint's `architecture` if it is there but its source is no longer
    the one the checkpoint records (the file was edited since), else None."""
    recorded, current = architecture.get("source_sha256"), source_digest(architecture["model"])
    if recorded and current and current != recorded:
        return model_file(architecture["model"])
    return None


def resolve(name):
    """`name` with a model file's path made absolute, so that the reference (which checkpoints
    record) holds from any folder."""
    check_name(name)
    if name in MODELS:
        return name
    path, function = _split(name)
    return f"{os.path.abspath(path)}:{function}"


def build(name, in_shape, num_classes, seed=0, input_grad=True):
    """A freshly initialised model in training mode for images `in_shape` (C, H, W) of
    `num_classes` classes; the same arguments give the same weights (for a user's model, if its
    function uses `seed` or seeds itself). ModelError (one line) for a model that cannot be built.

    input_grad=False tells the model that nothing consumes the gradient with respect to the
    images (true of a training loop), so its first layer may skip it and backward return None:
    for a first convolution that is a whole GEMM and scatter per step.
    """
    in_shape = tuple(int(v) for v in in_shape)
    check_name(name)
    if name in MODELS:
        try:
            model = MODELS[name](in_shape, num_classes, np.random.default_rng(seed))
        except ValueError as e:              # an image that the layers shrink to nothing
            raise ModelError(f"{name} cannot take {dims(in_shape)} images ({e})") from None
    else:
        model = _from_file(name, in_shape, num_classes, seed)
    _check_structure(name, model)
    model.needs_input_grad = input_grad
    return model


def _check_structure(name, model):
    """ModelError for a model that ddl cannot train: one without parameters, or one that uses a
    layer (or a parameter) in two places. Each layer keeps the input of its one call for its
    backward pass, and the replicas' flat buffer holds each parameter once."""
    seen = {}
    for place, module in model.named_modules():
        if id(module) in seen:
            first = seen[id(module)] or "the model"
            raise ModelError(f"model {name} uses one layer twice, as {first} and as {place}: "
                             f"make a layer for each place")
        seen.setdefault(id(module), place)
    owners = {}
    for place, p in model.named_parameters():
        if id(p) in owners:
            raise ModelError(f"model {name} shares one parameter between {owners[id(p)]} and "
                             f"{place}: give each layer its own")
        owners[id(p)] = place
    if not owners:
        raise ModelError(f"model {name} has no parameters: there is nothing to train")


def _from_file(name, in_shape, num_classes, seed):
    """The model that a user's file makes, checked on a batch of two blank images. Their file's
    folder goes on sys.path, as for `python file.py`; an exception inside their code keeps its
    traceback (it is a bug there), every other problem is a ModelError."""
    path, function = _split(name)
    if not os.path.isfile(path):
        raise ModelError(f"model {name}: no such file {path}")
    folder = os.path.dirname(os.path.abspath(path))
    if folder not in sys.path:
        sys.path.insert(0, folder)
    # Registered under a name of its own, as an import would, for what looks itself up there
    # (dataclasses, pickle).
    spec = importlib.util.spec_from_file_location(f"ddl_model:{os.path.abspath(path)}", path)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    make = getattr(module, function, None)
    if not callable(make):
        defined = [k for k, v in vars(module).items() if inspect.isfunction(v)
                   and v.__module__ == module.__name__]
        raise ModelError(f"model {name}: {path} defines no function {function!r} (it defines "
                         f"{', '.join(defined) or 'none'})")
    takes_seed = "seed" in inspect.signature(make).parameters
    model = make(in_shape, num_classes, **({"seed": seed} if takes_seed else {}))
    if not isinstance(model, nn.Module):
        raise ModelError(f"model {name} returned {type(model).__name__}, not an nn.Module")
    try:
        shape = (2, *trace(model, in_shape)[0][2])
    except Exception as e:      # whatever a model built for other images raises
        at = where(e)
        raise ModelError(f"model {name} cannot take {dims(in_shape)} images "
                         + (f"({at}: " if at else "(") + f"{type(e).__name__}: {one_line(e)})"
                         ) from None
    if shape != (2, num_classes):
        raise ModelError(f"model {name} maps images of {dims(in_shape)} to outputs of shape "
                         f"{shape[1:]} per image, not the ({num_classes},) logits of the "
                         f"{num_classes} classes")
    return model


def to_torch(model):
    """The torch.nn twin of `model`, same weights and buffers (torch imported here only: the
    benchmark and the parity tests compare against it). Conv2d, Linear, MaxPool2d, ReLU,
    Flatten, BatchNorm2d and GlobalAvgPool2d, in Sequential and Residual containers."""
    import torch

    class Residual(torch.nn.Module):
        def __init__(self, body, shortcut):
            super().__init__()
            self.body, self.shortcut = body, shortcut

        def forward(self, x):
            return self.body(x) + (x if self.shortcut is None else self.shortcut(x))

    twins = {
        nn.Conv2d: lambda m: torch.nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size,
                                             m.stride, m.padding, bias=m.bias is not None),
        nn.Linear: lambda m: torch.nn.Linear(m.in_features, m.out_features, m.bias is not None),
        nn.MaxPool2d: lambda m: torch.nn.MaxPool2d(m.kernel_size, m.stride),
        nn.ReLU: lambda m: torch.nn.ReLU(),
        nn.Flatten: lambda m: torch.nn.Flatten(),
        nn.BatchNorm2d: lambda m: torch.nn.BatchNorm2d(m.num_features, m.eps, m.momentum),
        nn.GlobalAvgPool2d: lambda m: torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1),
                                                          torch.nn.Flatten()),
        nn.Sequential: lambda m: torch.nn.Sequential(*map(twin, m)),
    }

    def twin(m):
        if isinstance(m, nn.Residual):
            return Residual(twin(m.body), None if m.shortcut is None else twin(m.shortcut))
        return twins[type(m)](m)
    result = twin(model)
    result.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})
    return result

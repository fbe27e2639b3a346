"""`ddl predict`: a checkpoint's class probabilities for a test image (`--index`) or for image
files (`--image`), one line each, and the picture (`--out`)."""
import numpy as np

from ddl import identity, images as image_files
from ddl.data import normalizer
from ddl.errors import UsageError
from ddl.evaluation import checked_split

SHOWN = 10          # every class up to this many, else the most likely ones


def probabilities(model, x):
    """Softmax float64 (k, K) of `model` (put in eval mode) on normalised images x (k, C, H, W)."""
    logits = model.eval()(x).astype(np.float64)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return probs / probs.sum(axis=1, keepdims=True)


def shown(probs):
    """The classes to list: all of them up to SHOWN, else the SHOWN most likely, likeliest first."""
    return np.argsort(-probs, kind="stable")[:SHOWN] if len(probs) > SHOWN else range(len(probs))


def listing(probs, names):
    return "  ".join(f"{names[k]}:{probs[k]:.3f}" for k in shown(probs))


def test_image(model, state, takes, checkpoint, data, other, index, echo):
    """Classify test image `index` of `data` (see `checked_split`); returns what `picture` draws."""
    test = checked_split(data, state, takes, checkpoint, other)
    if not 0 <= index < test.n:
        raise UsageError(f"--index {index} is outside the {test.n} test images")
    raw, y = test.read_raw(np.array([index]))
    probs = probabilities(model, test.normalize(raw))[0]
    names = test.class_names
    echo(f"test image {index}: predicted {names[probs.argmax()]} (label {names[y[0]]}, "
         f"p={probs.max():.4f})")
    echo("  " + listing(probs, names))
    return raw[0], probs, names, f"test image (label {names[y[0]]})"


def files(model, state, takes, paths, echo):
    """Classify image files `paths`, converted to the model's images (ddl/images.py) and
    normalised with the training set's statistics: one line each; returns what `picture` draws
    of the last one."""
    names = identity.class_names(state["data"])
    raw = np.stack([image_files.read(path, takes[0]) for path in paths])
    probs = probabilities(model, normalizer(state["data"]["mean"], state["data"]["std"])(raw))
    for path, p in zip(paths, probs):
        echo(f"{path}: predicted {names[p.argmax()]} (p={p.max():.4f})  {listing(p, names)}")
    return raw[-1], probs[-1], names, str(paths[-1])


def picture(drawn, out):
    """The image beside its class probabilities, written to `out`."""
    from ddl.plots import prediction
    image, probs, names, title = drawn
    prediction(image, probs, np.sort(shown(probs)), names, title, out)

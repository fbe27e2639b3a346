"""Models: the named ones for any image shape (sizes, PyTorch-compatible keys, seeding, an
end-to-end check on MNIST) and users' model files, with every one-line refusal."""
import gzip
import os
import sys

import numpy as np
import pytest

from conftest import MNIST
from ddl import kernels, models, nn
from ddl.errors import ModelError
from ddl.optim import SGD

CNNS = ["seed-cnn", "ref-cnn"]
KEYS = ["0.weight", "0.bias", "3.weight", "3.bias", "7.weight", "7.bias", "9.weight", "9.bias"]


def test_names():
    assert list(models.MODELS) == ["seed-cnn", "ref-cnn", "mlp", "resnet-mini", "vgg-mini"]
    assert models.DEFAULT_MODEL == "seed-cnn"
    with pytest.raises(ModelError, match="unknown model 'resnet50' .choose from seed-cnn, "
                                         "ref-cnn, mlp, resnet-mini, vgg-mini, or give "
                                         "FILE.py:FUNCTION"):
        models.build("resnet50", *MNIST)


@pytest.mark.parametrize("name", models.MODELS)
@pytest.mark.parametrize("in_shape, classes", [MNIST, ((3, 32, 32), 7), ((2, 17, 23), 3)])
def test_output_and_input_gradient_shapes(name, in_shape, classes):
    model = models.build(name, in_shape, classes)
    x = np.random.default_rng(0).normal(size=(3, *in_shape)).astype(np.float32)
    logits = model.forward(x)
    assert logits.shape == (3, classes) and logits.dtype == np.float32
    assert (logits < 0).any()  # raw logits: no ReLU at the end
    assert isinstance(model[-1], nn.Linear)
    assert model.backward(np.ones_like(logits)).shape == x.shape


@pytest.mark.parametrize("name, side", [("seed-cnn", 15), ("ref-cnn", 9)])
def test_images_too_small_for_a_model_are_one_line(name, side):
    models.build(name, (1, side + 1, side + 1), 10)
    with pytest.raises(ModelError, match=f"{name} cannot take 1x{side}x{side + 1} images "
                                         r"\(kernel . larger than padded input"):
        models.build(name, (1, side, side + 1), 10)


def test_resnet_mini():
    """A stem, three stages of one residual block each (16, 32, 64 channels; the last two
    project their shortcut), global average pooling: under 300k parameters, any image size."""
    model = models.build("resnet-mini", *MNIST)
    blocks = [m for m in model if isinstance(m, nn.ResidualBlock)]
    assert [b.shortcut is None for b in blocks] == [True, False, False]
    assert isinstance(model[-2], nn.GlobalAvgPool2d)
    assert sum(p.data.size for p in model.parameters()) == 77_754 < 300_000
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 9
    x = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
    assert model(x).shape == (2, 10)
    assert models.build("resnet-mini", (3, 1, 1), 2)(np.zeros((2, 3, 1, 1), np.float32)).shape \
        == (2, 2)


@pytest.mark.parametrize("name,count", [
    # conv 1->10 k5, conv 10->20 k5, linear 320->120, linear 120->10 (weights + biases)
    ("seed-cnn", (10 * 25 + 10) + (20 * 10 * 25 + 20) + (320 * 120 + 120) + (120 * 10 + 10)),
    ("ref-cnn", 225_034),
    ("mlp", (784 * 128 + 128) + (128 * 10 + 10)),
])
def test_parameter_count(name, count):
    assert sum(p.data.size for p in models.build(name, *MNIST).parameters()) == count


@pytest.mark.parametrize("name,shapes", [
    ("seed-cnn", [(10, 1, 5, 5), (10,), (20, 10, 5, 5), (20,),
                  (120, 320), (120,), (10, 120), (10,)]),
    ("ref-cnn", [(32, 1, 3, 3), (32,), (64, 32, 3, 3), (64,),
                 (128, 1600), (128,), (10, 128), (10,)]),
])
def test_state_dict_keys_follow_pytorch(name, shapes):
    sd = models.build(name, *MNIST).state_dict()
    assert list(sd) == KEYS
    assert [v.shape for v in sd.values()] == shapes


@pytest.mark.parametrize("name", models.MODELS)
def test_seeding(name):
    a, b, c = (models.build(name, *MNIST, seed=s).state_dict() for s in (3, 3, 4))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
        if k.endswith("weight") and a[k].ndim > 1:       # drawn (BatchNorm's start at 1)
            assert not np.array_equal(a[k], c[k]), k


# --- end to end: does seed-cnn really learn MNIST? ----------------------------------------------

def read_idx(path, offset):
    """Raw IDX gzip: a big-endian header (16 bytes for images, 8 for labels), then uint8s."""
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def mnist(raw, split, n):
    """First n images (n, 1, 28, 28) float32, normalised by MNIST's mean and std; labels (n,)."""
    images = read_idx(raw / f"{split}-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28)[:n]
    labels = read_idx(raw / f"{split}-labels-idx1-ubyte.gz", 8)[:n].astype(np.int64)
    return ((images / 255.0 - 0.1307) / 0.3081).astype(np.float32), labels


def test_seed_cnn_learns_mnist(mnist_raw):
    x, y = mnist(mnist_raw, "train", 6000)
    x_test, y_test = mnist(mnist_raw, "t10k", 1000)
    model = models.build("seed-cnn", *MNIST, seed=0)
    loss_fn = nn.CrossEntropyLoss()
    opt = SGD(model.parameters(), lr=0.05, momentum=0.9)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(300):
        batch = rng.integers(0, len(x), size=64)
        model.zero_grad()
        losses.append(loss_fn.forward(model.forward(x[batch]), y[batch]))
        model.backward(loss_fn.backward())
        model.step(opt)
    initial, final = np.mean(losses[:10]), np.mean(losses[-50:])
    assert initial > 2.0  # near log(10): the model starts out guessing
    assert final < 0.5 * initial, (initial, final)
    accuracy = np.mean(model.eval().forward(x_test).argmax(axis=1) == y_test)
    assert accuracy > 0.9, accuracy


def test_ref_cnn_pools_before_relu_with_the_same_function_and_gradients():
    """ref-cnn is specified Conv -> ReLU -> MaxPool; built with pooling first (cheaper). Check the
    specified order gives the same logits and every gradient, on real-valued ties included. On
    the NumPy kernels, which run every layer on its own: the compiled ones fuse both orders into
    one same pass, which could not tell them apart."""
    with kernels.using("numpy"):
        _same_function_in_both_orders()


def _same_function_in_both_orders():
    built, spec = models.build("ref-cnn", *MNIST, seed=3), models.build("ref-cnn", *MNIST, seed=3)
    spec = nn.Sequential(*(spec[i] for i in (0, 2, 1, 3, 5, 4, 6, 7, 8, 9)))
    assert [type(m).__name__ for m in spec][:3] == ["Conv2d", "ReLU", "MaxPool2d"]
    x = np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32)
    x[:, :, :8] = 0                                       # flat regions: tied pooling windows
    out_built, out_spec = built(x), spec(x)
    np.testing.assert_array_equal(out_built, out_spec)
    g = np.random.default_rng(1).standard_normal(out_built.shape).astype(np.float32)
    np.testing.assert_allclose(built.backward(g), spec.backward(g), rtol=1e-5, atol=1e-6)
    for (k, p), (_, q) in zip(built.named_parameters(), spec.named_parameters()):
        np.testing.assert_allclose(p.grad, q.grad, rtol=1e-5, atol=1e-6, err_msg=k)


def test_training_models_skip_the_image_gradient():
    model = models.build("seed-cnn", *MNIST, seed=0, input_grad=False)
    x = np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32)
    assert model.backward(np.ones_like(model(x))) is None
    assert model.parameters()[0].grad.any()


def test_resnet_mini_skips_the_image_gradient_too():
    """The flag reaches the first layer through the nested containers (nothing outside ddl/nn
    indexes the model)."""
    model = models.build("resnet-mini", (3, 8, 8), 4, input_grad=False)
    x = np.random.default_rng(0).random((2, 3, 8, 8), dtype=np.float32)
    assert not model.needs_input_grad and model.backward(np.ones_like(model(x))) is None


# --- users' model files ---------------------------------------------------------------------------
USER_MODEL = """
import numpy as np
from ddl import nn
from helper import width          # a module beside the file: importable, as for `python file.py`


def make_model(in_shape, num_classes, seed=0):
    rng = np.random.default_rng(seed)
    return nn.Sequential(nn.Conv2d(in_shape[0], width, 3, padding=1, rng=rng), nn.ReLU(),
                         nn.GlobalAvgPool2d(), nn.Linear(width, num_classes, rng=rng))


def unseeded(in_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(in_shape)), num_classes))


def not_a_module(in_shape, num_classes):
    return [1, 2]


def fixed_size(in_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(784, num_classes))


def wrong_classes(in_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(in_shape)), 3))


def buggy(in_shape, num_classes):
    return 1 / 0

shape = 3
"""


@pytest.fixture
def model_file(tmp_path, monkeypatch):
    (tmp_path / "nets").mkdir()
    (tmp_path / "nets" / "mine.py").write_text(USER_MODEL)
    (tmp_path / "nets" / "helper.py").write_text("width = 6\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    return "nets/mine.py"


def test_a_users_model_file(model_file):
    model = models.build(f"{model_file}:make_model", (3, 9, 7), 5, seed=4)
    assert model(np.zeros((2, 3, 9, 7), np.float32)).shape == (2, 5)
    again = models.build(f"{model_file}:make_model", (3, 9, 7), 5, seed=4).state_dict()
    other = models.build(f"{model_file}:make_model", (3, 9, 7), 5, seed=5).state_dict()
    assert all(np.array_equal(v, again[k]) for k, v in model.state_dict().items())  # seed given
    assert not np.array_equal(other["0.weight"], again["0.weight"])
    assert models.build(f"{model_file}:unseeded", (1, 4, 4), 2).training
    assert models.resolve(f"{model_file}:unseeded") == f"{os.path.abspath(model_file)}:unseeded"
    assert models.resolve("resnet-mini") == "resnet-mini"


@pytest.mark.parametrize("reference, words", [
    ("nets/gone.py:make_model", "model nets/gone.py:make_model: no such file nets/gone.py"),
    ("nets/mine.py:make", "nets/mine.py defines no function 'make' (it defines make_model, "
                          "unseeded, not_a_module, fixed_size, wrong_classes, buggy)"),
    ("nets/mine.py:shape", "defines no function 'shape'"),
    ("nets/mine.py:not_a_module", "model nets/mine.py:not_a_module returned list, not an "
                                  "nn.Module"),
    ("nets/mine.py:fixed_size", "model nets/mine.py:fixed_size cannot take 3x8x8 images "
                                "(layer 1 Linear(784, 10, bias=True) got input of shape (2, "
                                "192): ValueError: Linear takes (N, 784) inputs, got (2, 192): "
                                "give it in_features=192, or change the layers before it)"),
    ("nets/mine.py:wrong_classes", "maps images of 3x8x8 to outputs of shape (3,) per image, "
                                   "not the (10,) logits of the 10 classes"),
    ("nets/mine.py", "model 'nets/mine.py': name a model file and its function as "
                     "FILE.py:FUNCTION"),
    ("nets/mine:make_model", "name a model file and its function as FILE.py:FUNCTION"),
])
def test_a_bad_model_file_is_one_line(model_file, reference, words):
    with pytest.raises(ModelError) as err:
        models.build(reference, (3, 8, 8), 10)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_a_bug_in_a_users_model_keeps_its_traceback(model_file):
    with pytest.raises(ZeroDivisionError):
        models.build(f"{model_file}:buggy", (3, 8, 8), 10)

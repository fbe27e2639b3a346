"""Named models: shapes, sizes, PyTorch-compatible keys, seeding, and an end-to-end check."""
import gzip

import numpy as np
import pytest

from ddl import models, nn
from ddl.optim import SGD

CNNS = ["seed-cnn", "ref-cnn"]
KEYS = ["0.weight", "0.bias", "3.weight", "3.bias", "7.weight", "7.bias", "9.weight", "9.bias"]


def test_names():
    assert set(models.MODELS) == {"seed-cnn", "ref-cnn", "mlp"}
    assert models.DEFAULT_MODEL == "seed-cnn"
    with pytest.raises(ValueError, match="seed-cnn, ref-cnn, mlp"):
        models.build("resnet50")


@pytest.mark.parametrize("name", models.MODELS)
def test_output_and_input_gradient_shapes(name):
    model = models.build(name)
    x = np.random.default_rng(0).normal(size=(3, 1, 28, 28)).astype(np.float32)
    logits = model.forward(x)
    assert logits.shape == (3, 10) and logits.dtype == np.float32
    assert (logits < 0).any()  # raw logits: no ReLU at the end
    assert isinstance(model[-1], nn.Linear)
    assert model.backward(np.ones_like(logits)).shape == x.shape


@pytest.mark.parametrize("name,count", [
    # conv 1->10 k5, conv 10->20 k5, linear 320->120, linear 120->10 (weights + biases)
    ("seed-cnn", (10 * 25 + 10) + (20 * 10 * 25 + 20) + (320 * 120 + 120) + (120 * 10 + 10)),
    ("ref-cnn", 225_034),
    ("mlp", (784 * 128 + 128) + (128 * 10 + 10)),
])
def test_parameter_count(name, count):
    assert sum(p.data.size for p in models.build(name).parameters()) == count


@pytest.mark.parametrize("name,shapes", [
    ("seed-cnn", [(10, 1, 5, 5), (10,), (20, 10, 5, 5), (20,),
                  (120, 320), (120,), (10, 120), (10,)]),
    ("ref-cnn", [(32, 1, 3, 3), (32,), (64, 32, 3, 3), (64,),
                 (128, 1600), (128,), (10, 128), (10,)]),
])
def test_state_dict_keys_follow_pytorch(name, shapes):
    sd = models.build(name).state_dict()
    assert list(sd) == KEYS
    assert [v.shape for v in sd.values()] == shapes


@pytest.mark.parametrize("name", models.MODELS)
def test_seeding(name):
    a, b, c = (models.build(name, seed=s).state_dict() for s in (3, 3, 4))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
        if k.endswith("weight"):
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
    model = models.build("seed-cnn", seed=0)
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
    specified order gives the same logits and every gradient, on real-valued ties included."""
    built, spec = models.build("ref-cnn", seed=3), models.build("ref-cnn", seed=3)
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
    model = models.build("seed-cnn", seed=0, input_grad=False)
    x = np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32)
    assert model.backward(np.ones_like(model(x))) is None
    assert model.parameters()[0].grad.any()

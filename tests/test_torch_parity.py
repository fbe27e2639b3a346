"""ddl against PyTorch, when torch is installed (`make install-torch`, which CI runs):
the same weights give the same logits, loss, gradients and BatchNorm statistics, with either kernel
set, and state dicts go both ways."""
import numpy as np
import pytest

from conftest import MNIST, needs
from ddl import nn
from ddl.models import MODELS, build, to_torch

try:
    import torch
except ImportError:
    torch = None
pytestmark = pytest.mark.usefixtures("torch_here", "backend")  # NumPy and compiled kernels alike


@pytest.fixture(scope="module")
def torch_here():
    if torch is None:
        needs("torch", "torch is not installed (make install-torch)")


def assert_close(got, expected, what, rtol=1e-3, scale=1e-5, floor=0.0):
    """Equal within `rtol`, or within `scale` times the largest magnitude (float32 rounding),
    or within `floor` (a gradient that is zero in exact arithmetic: a bias before a BatchNorm)."""
    expected = expected.detach().numpy()
    np.testing.assert_allclose(got, expected, rtol=rtol,
                               atol=max(scale * np.abs(expected).max(), floor), err_msg=what)


def assert_same_buffers(model, reference, rtol=1e-5):
    buffers = dict(reference.named_buffers())
    for key, value in model.named_buffers():
        assert_close(value, buffers[key], key, rtol=rtol)


@pytest.mark.parametrize("name", MODELS)
def test_same_logits_loss_and_gradients(name, mnist_h5):
    from ddl.data import H5Dataset
    x, y = H5Dataset(mnist_h5, "train").read(np.arange(32))   # real digits: tied pool windows
    model = build(name, *MNIST, seed=1)
    reference = to_torch(model)
    criterion = nn.CrossEntropyLoss()
    loss = criterion(model(x), y)
    model.backward(criterion.backward())
    t_loss = torch.nn.functional.cross_entropy(reference(torch.from_numpy(x)),
                                               torch.from_numpy(y))
    t_loss.backward()
    assert loss == pytest.approx(t_loss.item(), rel=1e-5)
    grads = dict(reference.named_parameters())
    # BatchNorm's backward sums over the batch: float32 rounding then reaches small gradients
    scale = 3e-4 if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()) else 1e-5
    for key, p in model.named_parameters():
        assert_close(p.grad, grads[key].grad, key, scale=scale)
    assert_same_buffers(model, reference)                      # BatchNorm's running statistics
    with torch.no_grad():
        assert_close(model.eval()(x), reference.eval()(torch.from_numpy(x)), "eval logits")


@pytest.mark.parametrize("make", [
    lambda rng: nn.ResidualBlock(3, 3, rng=rng),                 # identity shortcut
    lambda rng: nn.ResidualBlock(3, 6, 2, rng=rng),              # 1x1 projection, stride 2
    lambda rng: nn.Sequential(nn.Conv2d(3, 4, 3, rng=rng), nn.BatchNorm2d(4), nn.ReLU(),
                              nn.GlobalAvgPool2d(), nn.Linear(4, 5, rng=rng)),
], ids=["identity", "projection", "global-average-pool"])
def test_new_layers_match_torch(make):
    """Outputs, input and parameter gradients and running statistics in training mode, then
    outputs in eval mode, on odd image sizes; in float64, so that they agree to rounding."""
    model = make(np.random.default_rng(2))
    reference = to_torch(model).double()
    model.to(np.float64)
    x = np.random.default_rng(3).standard_normal((4, 3, 9, 7))
    t_x = torch.from_numpy(x).requires_grad_()
    y, t_y = model(x), reference(t_x)
    assert_close(y, t_y, "output", rtol=1e-9, scale=1e-12)
    g = np.random.default_rng(4).standard_normal(y.shape)
    t_y.backward(torch.from_numpy(g))
    assert_close(model.backward(g), t_x.grad, "input gradient", rtol=1e-9, scale=1e-12)
    grads = dict(reference.named_parameters())
    assert [k for k, _ in model.named_parameters()] == list(grads)
    for key, p in model.named_parameters():
        assert_close(p.grad, grads[key].grad, key, rtol=1e-9, scale=1e-12, floor=1e-14)
    assert_same_buffers(model, reference, rtol=1e-12)
    with torch.no_grad():
        assert_close(model.eval()(x), reference.eval()(torch.from_numpy(x)), "eval output",
                     rtol=1e-9, scale=1e-12)


def test_torch_state_dict_loads_into_ddl():
    torch.manual_seed(0)
    reference = to_torch(build("resnet-mini", *MNIST, seed=0))
    for p in reference.parameters():                           # torch's own weights now
        torch.nn.init.normal_(p, std=0.1)
    for name, b in reference.named_buffers():
        if "running" in name:
            b.uniform_(0.5, 1.5)
    model = build("resnet-mini", *MNIST, seed=5)
    model.load_state_dict({k: v.detach().numpy() for k, v in reference.state_dict().items()})
    x = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(model.eval()(x),
                                   reference.eval()(torch.from_numpy(x)).numpy(),
                                   rtol=1e-4, atol=1e-4)

"""ddl against PyTorch, when torch is installed (`pip install torch==2.13.0`; CI runs without it):
the same weights give the same logits, loss and gradients, with either kernel set, and state dicts
go both ways."""
import numpy as np
import pytest

from ddl import nn
from ddl.models import MODELS, build, to_torch

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("backend")  # NumPy and compiled kernels alike


@pytest.mark.parametrize("name", MODELS)
def test_same_logits_loss_and_gradients(name, mnist_h5):
    from ddl.data import H5Dataset
    x, y = H5Dataset(mnist_h5, "train").read(np.arange(32))   # real digits: tied pool windows
    model = build(name, seed=1)
    reference = to_torch(model)
    criterion = nn.CrossEntropyLoss()
    loss = criterion(model(x), y)
    model.backward(criterion.backward())
    t_loss = torch.nn.functional.cross_entropy(reference(torch.from_numpy(x)),
                                               torch.from_numpy(y))
    t_loss.backward()
    assert loss == pytest.approx(t_loss.item(), rel=1e-5)
    grads = dict(reference.named_parameters())
    for key, p in model.named_parameters():
        np.testing.assert_allclose(p.grad, grads[key].grad.numpy(), rtol=1e-3,
                                   atol=1e-5 * np.abs(p.grad).max(), err_msg=key)


def test_torch_state_dict_loads_into_ddl():
    torch.manual_seed(0)
    reference = to_torch(build("seed-cnn", seed=0))
    for p in reference.parameters():                           # torch's own weights now
        torch.nn.init.normal_(p)
    model = build("seed-cnn", seed=5)
    model.load_state_dict({k: v.detach().numpy() for k, v in reference.state_dict().items()})
    x = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
    np.testing.assert_allclose(model(x), reference(torch.from_numpy(x)).detach().numpy(),
                               rtol=1e-4, atol=1e-3)

"""Losses: values against direct float64 formulas, gradients against finite differences."""
import numpy as np
import pytest

from ddl.nn import CrossEntropyLoss, MSELoss
from gradcheck import numerical_grad

pytestmark = pytest.mark.usefixtures("backend")  # NumPy and compiled kernels alike


def logits_and_labels(n=6, c=4, seed=0):
    rng = np.random.default_rng(seed)
    return 3 * rng.standard_normal((n, c)), rng.integers(0, c, size=n)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_value(reduction):
    z, y = logits_and_labels()
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)  # direct, fine for moderate logits
    per_sample = -np.log(p[np.arange(len(y)), y])
    expected = per_sample.mean() if reduction == "mean" else per_sample.sum()
    loss = CrossEntropyLoss(reduction)
    assert isinstance(loss(z, y), float)
    assert loss(z, y) == pytest.approx(expected, rel=1e-12)
    assert loss(z.astype(np.float32), y) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_gradient(reduction):
    z, y = logits_and_labels(seed=1)
    loss = CrossEntropyLoss(reduction)
    loss.forward(z, y)
    grad = loss.backward()
    np.testing.assert_allclose(grad, numerical_grad(lambda: loss.forward(z, y), z), rtol=1e-6,
                               atol=1e-9)


def test_cross_entropy_sum_is_n_times_mean():
    z, y = logits_and_labels(n=5)
    mean, total = CrossEntropyLoss("mean"), CrossEntropyLoss("sum")
    assert total(z, y) == pytest.approx(5 * mean(z, y), rel=1e-12)
    np.testing.assert_allclose(total.backward(), 5 * mean.backward(), rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_huge_logits_stay_finite(dtype):
    z = np.array([[1e4, 0, -1e4], [1e4, 1e4, -1e4]], dtype=dtype)
    loss = CrossEntropyLoss()
    value = loss(z, np.array([1, 0]))
    assert value == pytest.approx((1e4 + np.log(2)) / 2, rel=1e-6)
    grad = loss.backward()
    assert grad.dtype == dtype and np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad, [[0.5, -0.5, 0], [-0.25, 0.25, 0]], atol=1e-7)


def test_cross_entropy_rejects_bad_labels():
    z, _ = logits_and_labels(n=3, c=4)
    loss = CrossEntropyLoss()
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        loss(z, np.array([0, 4, 1]))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        loss(z, np.array([0, -1, 1]))
    with pytest.raises(ValueError, match="integers"):
        loss(z, np.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="shape"):
        loss(z, np.array([0, 1]))
    with pytest.raises(ValueError, match="reduction"):
        CrossEntropyLoss("none")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mse_value_and_gradient(reduction):
    rng = np.random.default_rng(2)
    pred, target = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    loss = MSELoss(reduction)
    sq = (pred - target) ** 2
    assert loss(pred, target) == pytest.approx(sq.mean() if reduction == "mean" else sq.sum(),
                                               rel=1e-12)
    grad = loss.backward()
    np.testing.assert_allclose(grad, numerical_grad(lambda: loss.forward(pred, target), pred),
                               rtol=1e-6, atol=1e-9)
    value64 = loss(pred, target)
    assert loss(pred.astype(np.float32), target.astype(np.float32)) == pytest.approx(value64,
                                                                                      rel=1e-5)
    assert loss.backward().dtype == np.float32
    with pytest.raises(ValueError, match="shape"):
        loss(pred, target[:2])

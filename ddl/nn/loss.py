"""Losses: `forward(...) -> float` caches what `backward() -> grad of the first input` needs.

reduction="mean" averages (the training loss); reduction="sum" adds, so per-rank sums can be
all-reduced and divided by the global count for an exact distributed evaluation.
"""
import numpy as np

from ddl import kernels


class _Loss:
    def __init__(self, reduction="mean"):
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.reduction = reduction

    def __call__(self, *args):
        return self.forward(*args)


class CrossEntropyLoss(_Loss):
    """Softmax cross-entropy of logits (N, C) against integer labels (N,) in [0, C)."""

    def forward(self, logits, labels):
        labels = np.asarray(labels)
        n, c = logits.shape
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers of shape ({n},), got {labels.dtype} "
                             f"{labels.shape}")
        bad = (labels < 0) | (labels >= c)
        if bad.any():
            raise ValueError(f"labels must lie in [0, {c}): got {np.unique(labels[bad])[:10]}")
        loss, grad = kernels.get().cross_entropy(logits, np.ascontiguousarray(labels, np.int64))
        if self.reduction == "mean":
            loss = loss / n
            grad /= np.float32(n)            # a new array from either backend
        self._grad = grad
        return float(loss)

    def backward(self):
        """-> grad of logits (N, C): softmax minus one-hot, divided by N for "mean"."""
        return self._grad


class MSELoss(_Loss):
    """Squared error of pred against target, same shape; "mean" averages over every element."""

    def forward(self, pred, target):
        if pred.shape != np.shape(target):
            raise ValueError(f"pred {pred.shape} and target {np.shape(target)} shapes differ")
        self._diff = pred - target
        loss = np.square(self._diff).sum(dtype=np.float64)
        return float(loss / self._diff.size if self.reduction == "mean" else loss)

    def backward(self):
        """-> grad of pred, same shape as pred."""
        grad = 2 * self._diff
        return grad / self._diff.size if self.reduction == "mean" else grad

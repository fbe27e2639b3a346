"""Losses: `forward(...) -> float` caches what `backward() -> grad of the first input` needs.

reduction="mean" averages (the training loss); reduction="sum" adds, so per-rank sums can be
all-reduced and divided by the global count for an exact distributed evaluation.
"""
import numpy as np


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
        # Shift by the row max before exp: exp never overflows, even for logits like 1e4.
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_z = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        log_p = shifted - log_z
        rows = np.arange(n)
        self._cache = log_p, labels, rows
        loss = -log_p[rows, labels].sum(dtype=np.float64)  # float64: long "sum"s stay accurate
        return float(loss / n if self.reduction == "mean" else loss)

    def backward(self):
        """-> grad of logits (N, C): softmax minus one-hot, divided by N for "mean"."""
        log_p, labels, rows = self._cache
        grad = np.exp(log_p)
        grad[rows, labels] -= 1
        if self.reduction == "mean":
            grad /= len(labels)
        return grad


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

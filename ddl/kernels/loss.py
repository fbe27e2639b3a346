"""Softmax cross-entropy, forward and gradient in one pass over the logits."""
import math

import numpy as np

from ddl.kernels.jit import kernel


@kernel("(T[:, ::1], int64[::1], T[:, ::1])", "(T[:, :], int64[::1], T[:, ::1])")
def _cross_entropy(logits, labels, grad):
    """Returns the summed loss (float64) over rows; grad (N, K) = softmax - one-hot, the gradient
    of that sum. Each row is shifted by its maximum so exp never overflows."""
    total = 0.0
    for i in range(logits.shape[0]):
        top = logits[i, 0]
        for j in range(1, logits.shape[1]):
            top = max(top, logits[i, j])
        z = logits.dtype.type(0)
        for j in range(logits.shape[1]):
            grad[i, j] = math.exp(logits[i, j] - top)
            z += grad[i, j]
        for j in range(logits.shape[1]):
            grad[i, j] /= z
        grad[i, labels[i]] -= 1
        total += math.log(z) + top - logits[i, labels[i]]
    return total


def cross_entropy(logits, labels):
    """As the NumPy backend's cross_entropy."""
    grad = np.empty(logits.shape, logits.dtype)
    return _cross_entropy(logits, labels, grad), grad

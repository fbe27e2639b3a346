"""The optimizers' update rules (ddl/optim.py writes them out; ddl/kernels/numpy.py is the
reference) as single passes over flat arrays: NumPy takes four to eight passes, each reading and
writing whole arrays.

Each kernel updates data (and its state) in place from grad, all flat arrays of one size: one
parameter, or all of them at once when they lie end to end in one flat buffer.
Hyperparameters arrive as Python floats and are rounded to the parameters' dtype first, as NumPy
does when it multiplies a float32 array by a Python float.
"""
import math

from ddl.kernels.jit import FLAT, kernel



@kernel(f"({FLAT}, {FLAT}, {FLAT}, float64, float64, float64, float64, boolean, boolean)")
def sgd(data, grad, buf, lr, momentum, dampening, weight_decay, nesterov, first):
    """torch.optim.SGD's step; buf is the momentum buffer (ignored without momentum), `first`
    when it holds nothing yet."""
    f = data.dtype.type
    lr, momentum, damped, weight_decay = f(lr), f(momentum), f(1 - dampening), f(weight_decay)
    for i in range(data.shape[0]):
        g = grad[i] + weight_decay * data[i]
        if momentum != 0:
            buf[i] = g if first else momentum * buf[i] + damped * g
            g = g + momentum * buf[i] if nesterov else buf[i]
        data[i] -= lr * g


@kernel(f"({FLAT}, {FLAT}, {FLAT}, {FLAT}, float64, float64, float64, float64, float64, "
        "float64)")
def adam(data, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step):
    """torch.optim.Adam's step number `step` (from 1)."""
    f = data.dtype.type
    size = f(lr / (1 - beta1 ** step))
    root_correction = f(math.sqrt(1 - beta2 ** step))
    keep1, keep2, beta1, beta2 = f(1 - beta1), f(1 - beta2), f(beta1), f(beta2)
    eps, weight_decay = f(eps), f(weight_decay)
    for i in range(data.shape[0]):
        g = grad[i] + weight_decay * data[i]
        exp_avg[i] = beta1 * exp_avg[i] + keep1 * g
        exp_avg_sq[i] = beta2 * exp_avg_sq[i] + keep2 * g * g
        data[i] -= size * exp_avg[i] / (math.sqrt(exp_avg_sq[i]) / root_correction + eps)


@kernel(f"({FLAT}, {FLAT}, {FLAT}, {FLAT}, {FLAT}, float64, float64, float64, float64, float64, "
        "boolean)")
def rmsprop(data, grad, square_avg, grad_avg, buf, lr, alpha, eps, weight_decay, momentum,
            centered):
    """torch.optim.RMSprop's step; grad_avg is used only when centered, buf only with momentum."""
    f = data.dtype.type
    keep, zero = f(1 - alpha), f(0)
    lr, alpha, eps, weight_decay, momentum = f(lr), f(alpha), f(eps), f(weight_decay), f(momentum)
    for i in range(data.shape[0]):
        g = grad[i] + weight_decay * data[i]
        square_avg[i] = alpha * square_avg[i] + keep * g * g
        if centered:
            grad_avg[i] = alpha * grad_avg[i] + keep * g
            avg = math.sqrt(max(square_avg[i] - grad_avg[i] * grad_avg[i], zero)) + eps
        else:
            avg = math.sqrt(square_avg[i]) + eps
        if momentum != 0:
            buf[i] = momentum * buf[i] + g / avg
            data[i] -= lr * buf[i]
        else:
            data[i] -= lr * (g / avg)

"""Central finite differences, for checking analytic gradients in float64."""
import numpy as np


def numerical_grad(f, x, eps=1e-6):
    """d f() / d x for a scalar function f of the array x, perturbing x IN PLACE (x float64)."""
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)  # views: x must be contiguous
    assert np.shares_memory(flat, x)
    for i in range(flat.size):
        orig = flat[i]
        flat[i] = orig + eps
        up = f()
        flat[i] = orig - eps
        down = f()
        flat[i] = orig
        gflat[i] = (up - down) / (2 * eps)
    return grad


def check_module(module, x, seed=0, before_forward=lambda: None, rtol=1e-5, atol=1e-7):
    """Compare module.backward's input and parameter gradients with finite differences.

    The scalar loss is a fixed random projection <r, module(x)>; `before_forward` runs before
    every forward (e.g. to reseed a dropout mask). The module is cast to float64 first.
    """
    module.to(np.float64)
    x = np.array(x, dtype=np.float64)
    before_forward()
    y = module.forward(x)
    r = np.random.default_rng(seed).standard_normal(y.shape)
    module.zero_grad()
    grad_x = module.backward(r)
    assert grad_x.shape == x.shape and grad_x.dtype == np.float64

    def loss():
        before_forward()
        return float(np.sum(r * module.forward(x)))

    np.testing.assert_allclose(grad_x, numerical_grad(loss, x), rtol=rtol, atol=atol,
                               err_msg="input gradient")
    params = module.named_parameters()
    for name, p in params:
        assert p.grad.dtype == np.float64
        np.testing.assert_allclose(p.grad, numerical_grad(loss, p.data), rtol=rtol, atol=atol,
                                   err_msg=f"gradient of {name}")
    return grad_x, params

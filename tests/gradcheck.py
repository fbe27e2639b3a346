"""Central finite differences, for checking analytic gradients in float64."""
import numpy as np


def numerical_grad(f, x, eps=1e-6, at=None):
    """d f() / d x for a scalar function f of the array x, perturbing x IN PLACE (x float64):
    at the flat indices `at` only (a 1-D array of them) if given, else everywhere."""
    flat = x.reshape(-1)                    # a view: x must be contiguous
    assert np.shares_memory(flat, x)
    grad = np.zeros(flat.size if at is None else len(at))
    for k, i in enumerate(range(flat.size) if at is None else at):
        orig = flat[i]
        flat[i] = orig + eps
        up = f()
        flat[i] = orig - eps
        down = f()
        flat[i] = orig
        grad[k] = (up - down) / (2 * eps)
    return grad.reshape(x.shape) if at is None else grad


def sample(size, most, seed=0):
    """Flat indices to check of an array of `size` entries: all of them, or past `most` the first,
    the last and a seeded random choice of the rest. The large cases' every entry is compared
    with the NumPy reference elsewhere; a sample checks their maths at 2 forwards an entry."""
    if size <= most:
        return np.arange(size)
    rest = np.random.default_rng(seed).choice(np.arange(1, size - 1), most - 2, replace=False)
    return np.concatenate([[0], np.sort(rest), [size - 1]])


def check_module(module, x, seed=0, before_forward=lambda: None, rtol=1e-5, atol=1e-7,
                 most=1000):
    """Compare module.backward's input and parameter gradients with finite differences, at
    `most` entries of each array (see `sample`).

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

    def compare(analytic, wrt, what):
        at = sample(wrt.size, most, seed)
        np.testing.assert_allclose(analytic.reshape(-1)[at], numerical_grad(loss, wrt, at=at),
                                   rtol=rtol, atol=atol, err_msg=what)

    compare(grad_x, x, "input gradient")
    params = module.named_parameters()
    for name, p in params:
        assert p.grad.dtype == np.float64
        compare(p.grad, p.data, f"gradient of {name}")
    return grad_x, params

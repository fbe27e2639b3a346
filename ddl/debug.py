"""`ddl train --debug`: find where training first turns NaN or inf."""
import numpy as np

from ddl.errors import Diverged


class FiniteCheck:
    """--debug: hooks on every module of `model` (see Module.add_hook) that stop training at the
    first module whose output, or whose own parameters' gradient, is not finite, naming it by its
    state_dict prefix, and where training is (`where`, which the loop sets at each step): a
    Diverged error of this rank alone. Innermost modules finish first, so they are named first."""

    def __init__(self, model):
        self.where = None
        self.names = {id(m): name or "(the model)" for name, m in model.named_modules()}
        model.add_hook(self)

    def __call__(self, module, direction, out):
        what = f"{type(module).__name__}({module.extra_repr()})"
        if out is not None and not np.isfinite(out).all():
            raise Diverged(f"training diverged at {self.where}: {direction} of layer "
                           f"{self.names[id(module)]} ({what}) produced "
                           f"{'NaN' if np.isnan(out).any() else 'inf'}")
        for name, p in module.named_parameters():
            if direction == "backward" and "." not in name and not np.isfinite(p.grad).all():
                raise Diverged(f"training diverged at {self.where}: gradient of layer "
                               f"{self.names[id(module)]} ({what}) parameter {name} is not "
                               f"finite")


class _NoCheck:
    where = None


def finite_check(model, on):
    """A FiniteCheck of `model` when `on` (--debug), else one that checks nothing and costs
    nothing."""
    return FiniteCheck(model) if on else _NoCheck()

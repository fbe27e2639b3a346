"""Which array kernels ddl runs: compiled with numba (the default) or plain NumPy (the reference).

    from ddl import kernels
    kernels.use("numpy")                 # `ddl train --kernels numpy`
    with kernels.using("numpy"):         # for a block of code
        ...

The layers and the loss ask `backend()` for their kernels at every call, and the optimizers and
Sequential's fused plan check `active()`, so the choice may change between steps (not between a
forward and its backward). Both backends offer the
same functions with the same shapes; `ddl.nn.functional` is the NumPy one and the reference that
every compiled kernel is tested against. numba is imported only when compiled kernels first run.
"""
import contextlib

NAMES = ("numba", "numpy")
_active = "numba"


def use(name):
    """Run the kernels of `name` ("numba" or "numpy") from now on."""
    global _active
    if name not in NAMES:
        raise ValueError(f"unknown kernels {name!r} (choose from {', '.join(NAMES)})")
    _active = name


def active():
    """The name of the kernels in use: "numba" or "numpy"."""
    return _active


@contextlib.contextmanager
def using(name):
    previous = _active
    use(name)
    try:
        yield
    finally:
        use(previous)


def backend():
    """The module of array kernels for the active choice: `ddl.kernels.compiled` (numba) or
    `ddl.nn.functional` (NumPy)."""
    if _active == "numba":
        from ddl.kernels import compiled
        return compiled
    from ddl.nn import functional
    return functional


def warm(comm=None):
    """Compile (or load from numba's cache) every kernel for float32 when the numba kernels are
    active; returns the seconds it took. Under MPI, rank 0 goes first and the others then load
    what it cached, instead of every rank compiling the same code at once on shared cores."""
    if _active != "numba":
        return 0.0
    from ddl.kernels import jit
    if comm is not None and comm.rank != 0:
        comm.barrier(what="barrier after rank 0's kernel compile", at_least=COMPILING)
    seconds = jit.warm()
    if comm is not None and comm.rank == 0:
        comm.barrier(what="barrier after rank 0's kernel compile", at_least=COMPILING)
    return seconds


# Seconds the ranks may wait for one another's compile whatever --timeout says: a cold compile
# takes seconds (docs/benchmarks.md), a slower or busier machine's minutes; --timeout is for ranks
# that hang.
COMPILING = 600.0

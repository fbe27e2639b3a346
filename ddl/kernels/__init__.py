"""The array backends: ddl/kernels/numba.py, compiled with numba (the default), and
ddl/kernels/numpy.py, plain NumPy (the reference). Peers: each offers every name of OPERATIONS,
with the same arguments and results.

    from ddl import kernels
    kernels.use("numpy")                 # for the rest of the run (`ddl train --kernels numpy`)
    with kernels.using("numpy"):         # for a block of code
        ...
    backend = kernels.get()              # the backend in use: backend.name, backend.conv2d_forward

Layers, the loss, the optimizers, Sequential's plan and the parameters' allocation all ask
`get()` when they run, so the choice may change between steps (not between a forward and its
backward). A new backend is one more module offering OPERATIONS, and one more name in NAMES.
numba is imported only when its backend is first asked for; `setup()` (which that does too)
configures the compiler before the first compile, and `warm` compiles every kernel ahead.
"""
import contextlib

NAMES = ("numba", "numpy")
# What every backend offers: the layers' kernels (each forward returns what its backward takes),
# the loss, the optimizers' update rules over flat arrays, --compress bf16's rounding and sum,
# allocation, and the plan that a Sequential runs (its layers, or groups of them that the backend
# runs in one pass), and `slow_steps(module)`, the layers it runs without compiled kernels (named
# by --timeline).
OPERATIONS = ("conv2d_forward", "conv2d_backward", "maxpool2d_forward", "maxpool2d_backward",
              "avgpool2d_forward", "avgpool2d_backward", "batchnorm2d_forward",
              "batchnorm2d_backward", "global_avgpool2d_forward", "global_avgpool2d_backward",
              "relu_forward", "relu_backward",
              "cross_entropy", "sgd", "adam", "rmsprop", "round_bf16", "sum_bf16", "empty",
              "zeros", "array", "plan", "slow_steps")
_active = "numba"


def use(name):
    """Run the backend `name` (one of NAMES) from now on."""
    global _active
    _known(name)
    _active = name


def _known(name):
    if name not in NAMES:
        raise ValueError(f"unknown kernels {name!r} (choose from {', '.join(NAMES)})")


@contextlib.contextmanager
def using(name):
    """Run the backend `name` inside the with block, and the one before it after."""
    previous = _active
    use(name)
    try:
        yield
    finally:
        use(previous)


def get(name=None):
    """The backend module `name`, by default the one in use; its `.name` is its name. The numba
    backend is set up (`setup()`) before it is first imported."""
    backend = _loaded.get(name or _active)
    return backend if backend is not None else _load(name or _active)


_loaded = {}    # name -> backend module: `get` runs for every layer at every step


def _load(name):
    _known(name)
    from ddl.kernels import arrays
    arrays.keep_freed_memory()      # every step allocates its activations anew (arrays.py)
    if name == "numba":
        from ddl.kernels import numba as backend    # which sets numba up as it is imported
    else:
        from ddl.kernels import numpy as backend
    _loaded[name] = backend
    return backend


def setup():
    """Configure numba for ddl's kernels (LLVM's options, the on-disk cache: ddl/kernels/jit.py)
    before anything compiles; once per process, later calls do nothing. Importing changes nothing
    process-wide: the CLI, `python -m ddl.kernels`, the tests and `warm` call this, and so does
    importing the compiled backend itself (ddl.kernels.numba)."""
    from ddl.kernels import jit
    jit.configure()


def target():
    """The CPU name that numba compiles the kernels for (measured per CPU model: docs/tuning.md);
    sets numba up if that has not happened yet."""
    from ddl.kernels import jit
    setup()
    return jit.target()


def warm(comm=None, processes=1):
    """Compile (or load from numba's cache) every kernel for float32 when the numba backend is
    in use; returns the seconds it took. Under MPI, rank 0 goes first and the others then load
    what it cached, instead of every rank compiling the same code at once on shared cores. Every
    rank compiles for rank 0's CPU name (docs/tuning.md). `processes` > 1 compiles in that many
    processes (jit.warm; not under MPI, whose ranks are not forked)."""
    if _active != "numba":
        return 0.0
    from ddl.kernels import jit
    if comm is not None and comm.size > 1:
        _rank_0s_target(comm)
    get()   # sets up, and imports (registers) every kernel
    if comm is not None and comm.rank != 0:
        comm.barrier(what="barrier after rank 0's kernel compile", at_least=COMPILING)
    seconds = jit.warm(processes if comm is None else 1)
    if comm is not None and comm.rank == 0:
        comm.barrier(what="barrier after rank 0's kernel compile", at_least=COMPILING)
    return seconds


def _rank_0s_target(comm):
    """Make every rank compile for the CPU name that rank 0 compiles for (measured there if need
    be) unless it has its own $NUMBA_CPU_NAME: code for different names may round differently,
    and the optimizer's must give bit-identical replicas on every node, however the nodes'
    measurements came out."""
    import os
    from ddl.kernels import jit, tune
    name = jit.target() if comm.rank == 0 else None
    comm.barrier(what="barrier after rank 0's kernel tuning", at_least=COMPILING)
    os.environ.setdefault(tune.EXPLICIT, comm.bcast_obj(name, what="rank 0's kernel CPU name"))


def choose(rehearse, comm=None, log=None):
    """With the numba backend in use, make the plan of which algorithm runs each convolution
    that `rehearse()` (one forward and backward of the model, on the shapes of training) runs:
    rank 0 times the candidates for each shape, or reads what it timed before, and every rank
    runs its choices, since replicas that ran different algorithms would differ in their last
    bits (ddl/kernels/convplan.py). Returns (shapes planned, seconds it took). A bad
    $DDL_CONV_ALGORITHM is a UsageError, on every rank."""
    if _active != "numba":
        return 0, 0.0
    import time
    from ddl.comm import SingleCommunicator, agree
    from ddl.kernels import convplan
    comm, started, backend = comm or SingleCommunicator(), time.perf_counter(), get()

    def measure():
        backend.forced_algorithm()
        try:
            if comm.rank == 0:
                return convplan.measure(rehearse, backend.candidates, backend.trial, log)[0]
        finally:    # the others wait for rank 0's timing as for its compile
            comm.barrier(what="barrier after rank 0's convolution plan", at_least=COMPILING)
    plan = agree(comm, measure, "check of rank 0's convolution plan")
    plan = comm.bcast_obj(plan, what="broadcast of rank 0's convolution plan")
    convplan.adopt(plan)
    return len(plan), time.perf_counter() - started


# Seconds the ranks may wait for one another's compile whatever --timeout says: a cold compile
# takes seconds (docs/benchmarks.md), a slower or busier machine's minutes; --timeout is for ranks
# that hang.
COMPILING = 600.0

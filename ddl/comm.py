"""Communicators named after MPI's verbs: one over mpi4py's COMM_WORLD, one single-process stand-in.

The training loop is written once against this interface; plain `ddl train` gets the stand-in and
never initialises MPI. Array verbs work in place on contiguous NumPy buffers; the `_obj` verbs
pickle.
"""
import contextlib
import functools
import operator
import os
import pickle
import platform
import sys
import threading
import time

import numpy as np

from ddl.errors import DDLError, Hung, MPIUnavailable
from ddl.watchdog import DEFAULT_TIMEOUT, Scope, Watchdog

# Launchers export one of these to every rank; their presence (with a size > 1) is the only signal
# we need, so a plain `ddl train` never pays for MPI_Init. Slurm's are the job step's: a batch
# script or an salloc shell has SLURM_NTASKS too, but is one process.
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "SLURM_STEP_NUM_TASKS")
_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")
_LOCAL_SIZE_VARS = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_STEP_TASKS_PER_NODE")
# Seconds between printing why and MPI_Abort (see MPICommunicator.abort).
ABORT_PAUSE = 0.3
# When ranks outnumber cores, a rank waiting in a collective must not spin on a core that a
# computing rank needs (docs/measured.md has the figures). Read at MPI_Init.
_YIELD_WHEN_IDLE = {"MPIR_CVAR_CH4_PROGRESS_THROTTLE": "1",
                    "MPIR_CVAR_CH4_PROGRESS_THROTTLE_NO_PROGRESS_COUNT": "1",
                    "OMPI_MCA_mpi_yield_when_idle": "1"}


def _from_env(names, default):
    for var in names:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return default


def launched_size():
    """World size announced by the launcher's environment (1 when not launched)."""
    return _from_env(_SIZE_VARS, 1)


def oversubscribed():
    """More ranks on this machine than cores this process may run on. Where the job's nodes are
    emulated on one machine (scripts/emulated-cluster.sh sets DDL_NODES_SHARE_CORES=1), every rank
    of the job shares its cores, whatever the launcher counts per node."""
    shared = os.environ.get("DDL_NODES_SHARE_CORES") == "1"
    local = launched_size() if shared else _from_env(_LOCAL_SIZE_VARS, launched_size())
    return local > len(os.sched_getaffinity(0))


def launched_rank():
    """This process's rank as the launcher announced it (0 when not launched); lets a usage
    error print once, before MPI is even initialised."""
    return _from_env(_RANK_VARS, 0)


# The MPI library that can talk to each kind of launcher, by soname, with what to do when it is
# missing. Open MPI's mpirun (like any PMIx launcher) cannot start the mpich wheel's library: every
# rank would die in MPI_Init with MPICH's error stack. Hydra (the mpich wheel's, Debian's or Intel
# MPI's mpiexec) and Slurm's srun --mpi=pmi2 speak PMI, which Open MPI's library does not.
_LIBRARIES = {
    "openmpi": ("libmpi.so.40", "a PMIx launcher (Open MPI's mpirun, srun --mpi=pmix)",
                "install Open MPI's library (Debian: apt-get install libopenmpi3), or launch "
                "with `ddl launch`, the venv's mpiexec or srun --mpi=pmi2"),
    "mpich": ("libmpi.so.12", "an MPICH launcher (Hydra's mpiexec, srun --mpi=pmi2)",
              "pip install mpich, or launch with Open MPI's mpirun"),
}


def _launcher_abi():
    """'openmpi' or 'mpich': the ABI of the MPI library the launcher can start; None without PMI."""
    if "OMPI_COMM_WORLD_SIZE" in os.environ or "PMIX_RANK" in os.environ:
        return "openmpi"
    return "mpich" if "PMI_RANK" in os.environ else None


def _normal_abi(name):
    """mpi4py's spelling of an ABI name; Intel MPI is MPICH's ABI."""
    name = name.lower().translate({ord(c): None for c in " -_"})
    return "mpich" if name == "impi" else name


def choose_mpi_library():
    """Point mpi4py (MPI4PY_LIBMPI) at the MPI library that matches the launcher, before
    mpi4py.MPI is imported: the venv's own (the mpich wheel, or Open MPI's wheel), else the
    system's. A library named in MPI4PY_LIBMPI or MPI4PY_MPIABI is checked, not replaced.
    Raises MPIUnavailable saying what to install or which launcher to use."""
    import ctypes
    want = _launcher_abi()
    if want is None:
        raise MPIUnavailable(f"srun started {launched_size()} tasks without a PMI for MPI to "
                             "connect them: run `srun --mpi=pmi2` (or set MpiDefault=pmi2)")
    soname, launcher, remedy = _LIBRARIES[want]
    asked = os.environ.get("MPI4PY_MPIABI")
    if asked:
        if _normal_abi(asked) != want:
            raise MPIUnavailable(f"MPI4PY_MPIABI={asked} does not match {launcher}, which "
                                 f"started this rank: unset it")
        return
    given = os.environ.get("MPI4PY_LIBMPI")
    if given and os.pathsep in given:           # a search path: mpi4py's business
        return
    for name in [given] if given else [os.path.join(sys.prefix, "lib", soname), soname]:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        if ("openmpi" if hasattr(lib, "ompi_mpi_comm_self") else "mpich") != want:
            raise MPIUnavailable(f"MPI4PY_LIBMPI={given} is not the MPI of {launcher}, which "
                                 f"started this rank: unset it")
        os.environ["MPI4PY_LIBMPI"] = name
        return
    if given:
        raise MPIUnavailable(f"MPI4PY_LIBMPI={given} cannot be loaded")
    raise MPIUnavailable(f"{launcher} started this rank, but its MPI library ({soname}) is not "
                         f"installed: {remedy}")


class _Scoped:
    """What both communicators share: the `Scope` their collectives wait in (ddl/watchdog.py:
    how long a rank may wait, and where the job is, for the message when it waited too long).
    The verbs take `what`, the collective's name in that message."""

    def __init__(self, timeout=DEFAULT_TIMEOUT):
        self.scope = Scope(timeout)

    @contextlib.contextmanager
    def at(self, where, timeout=None):
        """Within the block, collectives are `where` the job is ("of step 1,204", "at the end of
        epoch 3"), and wait at most `timeout` seconds (None: as outside it; 0: for ever)."""
        outer = self.scope
        self.scope = Scope(outer.timeout if timeout is None else timeout, where)
        try:
            yield self
        finally:
            self.scope = outer


class SingleCommunicator(_Scoped):
    """A world of one: every collective is the identity, so debug mode costs nothing."""

    rank, size = 0, 1
    hosts = (platform.node(),)

    def allreduce(self, buf, op="sum", what="all-reduce"):
        return buf

    def iallreduce(self, buf, op="sum", what="all-reduce"):
        return _Done()

    def iallgather(self, send, recv, what="all-gather"):
        recv[0] = send
        return _Done()

    def bcast(self, buf, root=0, what="broadcast"):
        return buf

    def barrier(self, what="barrier", at_least=0.0):
        pass

    def allreduce_obj(self, obj, op="sum", what="all-reduce"):
        return obj

    def bcast_obj(self, obj, root=0, what="broadcast"):
        return obj

    def allgather_obj(self, obj, what="all-gather"):
        return [obj]

    def gather_obj(self, obj, root=0, what="gather"):
        return [obj]

    def abort(self, code=1):
        sys.stderr.flush()
        os._exit(code)


class _Done:
    def test(self):
        return True

    def wait(self):
        pass


class _Pending:
    """A started collective; `wait()` finishes it with `finish` (the communicator's `_wait`)."""

    def __init__(self, request, finish, what, lock):
        self.request, self.finish, self.what, self.lock = request, finish, what, lock

    def test(self):
        """Let MPI move the collective on (MPICH progresses only inside MPI calls); True when
        it has completed. `wait()` must still follow, under the watchdog. Any thread may call
        it (ddl/progress.py)."""
        with self.lock:
            return self.request.Test()

    def wait(self):
        self.finish(self.request, self.what)


def _locked(method):
    """`method` with the communicator's lock held: nothing else enters MPI meanwhile."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self.lock:
            return method(self, *args, **kwargs)
    return locked


_REDUCE = {"sum": operator.add, "max": max, "min": min}


class MPICommunicator(_Scoped):
    """COMM_WORLD through mpi4py; array verbs use the buffer interface (no pickling). Every verb
    is a nonblocking collective finished by the watchdog (ddl/watchdog.py), so a rank that waits
    neither spins on a core nor waits for ever."""

    def __init__(self, timeout=DEFAULT_TIMEOUT):
        super().__init__(timeout)
        choose_mpi_library()
        if oversubscribed():
            for var, value in _YIELD_WHEN_IDLE.items():
                os.environ.setdefault(var, value)
        import mpi4py
        # One thread in MPI at a time, under `lock`: the main thread, or the exchange's progress
        # thread (ddl/progress.py). Below MPI_THREAD_MULTIPLE, MPICH takes no locks of its own.
        mpi4py.rc.thread_level = "serialized"
        from mpi4py import MPI
        self.MPI = MPI
        self.lock = threading.RLock()
        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.hosts = self.comm.allgather(MPI.Get_processor_name())     # each rank's host
        self.watchdog = Watchdog(MPI, self.comm, self.hosts)
        self._ops = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}

    def allreduce(self, buf, op="sum", what="all-reduce"):
        self.iallreduce(buf, op, what).wait()
        return buf

    @_locked
    def iallreduce(self, buf, op="sum", what="all-reduce"):
        """Start an in-place all-reduce; call `.wait()` on the result before reading `buf`."""
        request = self.comm.Iallreduce(self.MPI.IN_PLACE, buf, op=self._ops[op])
        return _Pending(request, self._wait, what, self.lock)

    @_locked
    def iallgather(self, send, recv, what="all-gather"):
        """Start gathering every rank's array `send` into the rows of `recv` (size, *send.shape),
        in rank order; call `.wait()` on the result before reading `recv`."""
        request = self.comm.Iallgather(send, recv)
        return _Pending(request, self._wait, what, self.lock)

    @_locked
    def bcast(self, buf, root=0, what="broadcast"):
        self._wait(self.comm.Ibcast(buf, root=root), what)
        return buf

    @_locked
    def barrier(self, what="barrier", at_least=0.0):
        """`at_least`: seconds this barrier may take whatever the timeout, for a wait on work of
        unknown length (rank 0 compiling the kernels)."""
        self._wait(self.comm.Ibarrier(), what, at_least)

    def allreduce_obj(self, obj, op="sum", what="all-reduce"):
        return functools.reduce(_REDUCE[op], self.allgather_obj(obj, what))

    def bcast_obj(self, obj, root=0, what="broadcast"):
        data = _pickled(obj) if self.rank == root else None
        size = self.bcast(np.array([0 if data is None else data.size], np.int64), root, what)
        if data is None:
            data = np.empty(size[0], np.uint8)
        self.bcast(data, root, what)
        return obj if self.rank == root else pickle.loads(data)

    def allgather_obj(self, obj, what="all-gather"):
        return self._gather(obj, None, what)

    def gather_obj(self, obj, root=0, what="gather"):
        """Every rank's `obj`, in rank order, on `root`; None elsewhere."""
        return self._gather(obj, root, what)

    @_locked
    def _gather(self, obj, root, what):
        """Pickles gathered on `root`, or on every rank when root is None: their sizes first."""
        data = _pickled(obj)
        sizes = np.zeros(self.size, np.int64)
        mine = np.array([data.size], np.int64)
        self._wait(self.comm.Iallgather(mine, sizes) if root is None else
                   self.comm.Igather(mine, sizes, root), what)
        if root is not None and self.rank != root:
            self._wait(self.comm.Igatherv(data, None, root), what)
            return None
        out = np.empty(sizes.sum(), np.uint8)
        spec = [out, (sizes, np.cumsum(sizes) - sizes), self.MPI.BYTE]
        self._wait(self.comm.Iallgatherv(data, spec) if root is None else
                   self.comm.Igatherv(data, spec, root), what)
        ends = np.cumsum(sizes)
        return [pickle.loads(out[end - size:end]) for size, end in zip(sizes, ends)]

    @_locked
    def _wait(self, request, what, at_least=0.0):
        """Finish `request` under the watchdog, in the scope of the moment."""
        self.watchdog.wait(request, what, self.scope, at_least)

    def abort(self, code=1):
        sys.stdout.flush()
        sys.stderr.flush()
        # What this rank printed reaches the launcher through a pipe to its local proxy (Hydra's
        # or Open MPI's), which stops forwarding once the abort's kill arrives: without a pause,
        # the job could end on its status alone, its one-line reason lost (1 run in 10, measured).
        time.sleep(ABORT_PAUSE)
        self.comm.Abort(code)


def _pickled(obj):
    return np.frombuffer(pickle.dumps(obj, pickle.HIGHEST_PROTOCOL), np.uint8)


def world():
    """The communicator for this process: MPI when a launcher started several ranks."""
    return MPICommunicator() if launched_size() > 1 else SingleCommunicator()


def agree(comm, fn, what="check that every rank succeeded"):
    """`fn()` on every rank; a DDLError on any rank is raised on every rank (rank 0's, else the
    first failing rank's, named), so all stop together and none waits in a collective for one
    that left. `what` names the collective that follows `fn` (for the watchdog: "rank 0 did not
    reach the checkpoint write ...")."""
    try:
        result, problem = fn(), None
    except Hung:                    # this rank ends the job now: no collective can complete
        raise
    except DDLError as e:
        result, problem = None, (type(e), str(e))
    problems = [(r, p) for r, p in enumerate(comm.allgather_obj(problem, what)) if p]
    if problems:
        r, (kind, message) = problems[0]
        raise kind(message if r == 0 else f"rank {r}: {message}", everywhere=True)
    return result

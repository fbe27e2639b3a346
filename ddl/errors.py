"""Every error a user can fix, in one place: the CLI prints its one-line message, no traceback, and
exits with its `status` (the table is in docs/faults.md). Anything else is a bug and keeps its
traceback.
"""


class DDLError(Exception):
    """An error the user can fix. `everywhere`: raised on every rank of the job at once (through
    `comm.agree`, or from numbers every rank shares), so the job can end without MPI_Abort.
    `prefix` starts the line the CLI prints; `names_ranks`: the message already says which ranks
    it is about, so the CLI does not prefix the rank that raised it."""
    status = 1
    prefix = "Error: "
    names_ranks = False

    def __init__(self, message, everywhere=False):
        super().__init__(message)
        self.everywhere = everywhere


class UsageError(DDLError):
    """A bad option, input file or output path, found before any work starts."""
    status = 2


class DataError(UsageError):
    """A data file that cannot be used; the message names the file and the problem."""


class CheckpointError(UsageError):
    """A checkpoint that cannot be used (or continued); the message names the file."""


class ModelError(UsageError):
    """A model that cannot be built for the data: an unknown name, a model file or function that
    is missing, a function that returns no nn.Module, images that a named model cannot take."""


class LaunchError(UsageError):
    """An mpiexec or hostfile that `ddl launch` cannot use."""


class MPIUnavailable(UsageError):
    """No MPI library here can talk to the launcher that started this rank (found before
    MPI_Init, whose own error would be a stack from every rank)."""


class PrepareError(UsageError):
    """Raw files that cannot become a dataset; the message names the file and the problem."""


class Diverged(DDLError):
    """The loss or a gradient turned NaN or inf: training stops before it spoils any weights."""
    status = 3


class OutputError(DDLError):
    """An output file could not be written (a full disk, a quota, a vanished folder); the
    previous version of the file is kept."""
    status = 4


class KernelCacheError(DDLError):
    """numba's kernel cache is damaged in a way that ddl could not repair by itself (truncated
    files it removes and rebuilds); the message names the folder to remove."""


class ReplicaDivergence(DDLError):
    """The replicas' parameters differ across ranks (a bug, or a user's model that is not
    deterministic): found by every rank together, from one all-gather, and named in the
    message."""
    names_ranks = True

    def __init__(self, message):
        super().__init__(message, everywhere=True)


class Hung(DDLError):
    """A rank did not reach a collective within --timeout (stopped, deadlocked, stuck in I/O):
    raised on one rank that waited, which ends the whole job."""
    status = 5
    names_ranks = True


class Stopped(DDLError):
    """SIGTERM or SIGINT stopped the run after a step that every rank finished (and saved, with
    --checkpoint). Its status is the shell's for that signal, 128 + N."""
    prefix = ""

    def __init__(self, signum, message):
        super().__init__(message, everywhere=True)
        self.status = 128 + signum


def dims(shape):
    """An image shape as the messages write it: (1, 28, 28) -> "1x28x28"."""
    return "x".join(map(str, shape))


def one_line(e):
    """An exception's message on one line (a library's may span several), or its type's name."""
    return " ".join(str(e).split()) or type(e).__name__

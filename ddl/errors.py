"""Every error a user can fix, in one place: the CLI prints its one-line message, no traceback, and
exits with its `status` (the table is in the README). Anything else is a bug and keeps its
traceback.
"""


class DDLError(Exception):
    """An error the user can fix. `everywhere`: raised on every rank of the job at once (through
    `train.agree`, or from numbers every rank shares), so the job can end without MPI_Abort."""
    status = 1

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

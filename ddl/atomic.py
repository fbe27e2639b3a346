"""Output files that never clobber an input or each other, and appear whole or not at all: write to
a temporary name, flush it to the disk, rename it into place, flush the folder."""
import contextlib
import io
import os
import re
import secrets

from ddl.errors import OutputError, UsageError, one_line


# A temporary file is PATH.PID.RANDOM.tmp: the PID lets `remove_leftovers` tell a dead writer's
# file from a live one's, the random part makes the name unguessable, and it is created with
# O_EXCL | O_NOFOLLOW, so that nothing planted at that name (a symbolic link to another file, say)
# can receive the write.
_CREATE = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def create_new(path_prefix):
    """A new file `path_prefix.RANDOM.tmp` that did not exist, opened for reading and writing:
    (its name, a buffered binary file object). Mode 0666 less the umask, like open()'s."""
    while True:
        tmp = f"{path_prefix}.{secrets.token_hex(8)}.tmp"
        try:
            return tmp, os.fdopen(os.open(tmp, _CREATE, 0o666), "w+b")
        except FileExistsError:         # 2**64 names: only a planted file comes here
            continue


@contextlib.contextmanager
def replacing(path):
    """Yield a new binary file (see `create_new`) beside `path`; on success sync it
    and rename it to `path` (atomic on one file system), on any failure or interruption remove
    it. A crash mid-write thus never leaves a half-written file that looks valid, nor clobbers
    the previous one; the rename replaces a symbolic link at `path` itself, never the file it
    points to. An OSError (a full disk, a quota, a vanished folder) becomes an OutputError
    naming `path`."""
    path = os.fspath(path)
    tmp = None
    try:
        tmp, f = create_new(f"{path}.{os.getpid()}")
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _sync_folder(path)
    except OSError as e:
        kept = "; the previous file is kept" if os.path.exists(path) else ""
        reason = e.strerror or one_line(e)
        raise OutputError(f"cannot write {path} ({reason}){kept}") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)


def write_bytes(path, data):
    """`data` (bytes or a buffer) into `path` through `replacing`, synced to the disk before the
    rename, so that even a power cut leaves the old file or the new one."""
    with replacing(path) as f:
        f.write(data)


class Sink(io.RawIOBase):
    """A binary file whose writes never fail, for a writer that must not see one fail: HDF5 (2.0,
    under h5py 3.16) crashes the interpreter when it closes a file whose write failed, after a
    many-line error (tried on a full tmpfs, writing to a path and to a Python file alike). The
    first OSError (a full disk, a quota) is kept instead and raised by `check()`; later writes
    are dropped, and reads past what was written give zeros, as HDF5's own POSIX driver gives
    them."""

    def __init__(self, f):
        super().__init__()
        self.f, self.error = f, None

    def readable(self):
        return True

    def writable(self):
        return True

    def seekable(self):
        return True

    def seek(self, offset, whence=io.SEEK_SET):
        return self.f.seek(offset, whence)

    def tell(self):
        return self.f.tell()

    def readinto(self, buffer):
        view = memoryview(buffer).cast("B")
        n = self.f.readinto(view)
        view[n:] = bytes(len(view) - n)
        self.f.seek(len(view) - n, io.SEEK_CUR)
        return len(view)

    def write(self, data):
        size = memoryview(data).nbytes
        if self.error is None:
            try:
                return self.f.write(data)
            except OSError as e:
                self.error = e
        self.f.seek(size, io.SEEK_CUR)
        return size

    def truncate(self, size=None):
        if self.error is None:
            try:
                return self.f.truncate(size)
            except OSError as e:
                self.error = e
        return size

    def flush(self):
        if self.error is None:
            try:
                self.f.flush()
            except OSError as e:
                self.error = e

    def check(self):
        """Raise the first failed write's OSError, if any."""
        if self.error is not None:
            raise self.error


@contextlib.contextmanager
def streaming(path):
    """Yield a Sink on a temporary file beside `path`, for a writer that streams more than memory
    holds (`write_bytes` needs it all at once); when the block ends the file is synced and renamed
    to `path` (see `replacing`). The writer calls `check()` now and then to stop early; a write
    that failed is an OutputError naming `path` at the latest when the block ends, and the previous
    file is kept. Close the writer inside the block: its last writes come then."""
    with replacing(path) as f:
        sink = Sink(f.raw)          # unbuffered: a failed write is seen at once
        yield sink
        sink.check()


def _sync_folder(path):
    """Flush the folder of `path` to the disk, and with it the rename into that folder: until
    then a power cut may bring the previous file back, or neither."""
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_leftovers(path):
    """Remove the temporary files of `path` that a process killed mid-write left behind
    (`PATH.PID.RANDOM.tmp`, see `replacing`), those of processes no longer running here. Returns
    their names."""
    folder, name = os.path.split(os.path.abspath(path))
    pattern = re.compile(re.escape(name) + r"\.(\d+)(\.[0-9a-f]+)?\.tmp")  # (PATH.PID.tmp: before)
    removed = []
    for entry in sorted(os.listdir(folder)):
        found = pattern.fullmatch(entry)
        if found and not _running(int(found[1])):
            with contextlib.suppress(FileNotFoundError):    # another job's cleanup got there first
                os.remove(os.path.join(folder, entry))
                removed.append(entry)
    return removed


def _running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:             # another user's process
        pass
    return True


def same_file(a, b):
    """Whether paths `a` and `b` name one file, through symbolic links, `..` and hard links."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:                      # one of them does not exist (yet)
        return False


def check_outputs(outputs, inputs=()):
    """Raise UsageError unless every output can be written without touching an input or another
    output. `outputs` and `inputs` are (option, path) pairs, e.g. ("--plot", "curves.png")."""
    for i, (option, path) in enumerate(outputs):
        for other, used in list(inputs) + list(outputs[:i]):
            if same_file(path, used):
                raise UsageError(f"{option} {path} is the same file as {other} {used}: "
                                 f"choose another path")
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise UsageError(f"{option} {path}: folder {folder} does not exist")
        if os.path.isdir(path):
            raise UsageError(f"{option} {path} is a folder, not a file")
        if os.path.exists(path) and not os.path.isfile(path):   # a device, a FIFO: renaming
            raise UsageError(f"{option} {path} is not a plain file (a device, FIFO or socket)")
        if not os.access(folder, os.W_OK) or (os.path.exists(path)
                                              and not os.access(path, os.W_OK)):
            raise UsageError(f"{option} {path}: not writable")

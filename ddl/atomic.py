"""Files that appear whole or not at all: write to a temporary name, then rename into place."""
import contextlib
import os


@contextlib.contextmanager
def replacing(path):
    """Yield a temporary path beside `path`; on success rename it to `path` (atomic on one file
    system), on any failure or interruption remove it. A crash mid-write thus never leaves a
    half-written file that looks valid, nor clobbers the previous one."""
    path = os.fspath(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

"""Atomic HDF5 checkpoints: nested dicts of arrays and plain values, one group per dict.

A checkpoint holds `model` (the state_dict), `architecture` (what rebuilds the model: the named
model or the user's FILE.py:FUNCTION, the image shape and the number of classes), `optimizer`,
`schedule`, `epoch` (epochs done), `step` (steps done of the next epoch: a checkpoint taken
mid-epoch), `partial` (that epoch's sums so far: `loss_sum`, `seconds`), `config`, `data` (what
identifies the data set and where it is: ddl/identity.py), `world_size` and the metrics `history`.
The sampler and the dropout generators need no state of their own: both are derived from (seed,
epoch, step, rank), so (config.seed, epoch, step) is their state. The file carries its own marker
attribute, `ddl_checkpoint` (the format version), so no other HDF5 file (a dataset) passes for
one. Format 1, from before ddl took images other than MNIST's and checkpointed mid-epoch, reads
as an MNIST model at step 0; what a format 2 file from before the data was recorded lacks, `load`
fills in.
"""
import copy
import errno
import fcntl
import io
import json
import os
import socket
import stat

import h5py
import numpy as np

from ddl.atomic import write_bytes
from ddl.errors import CheckpointError, one_line

MARKER = "ddl_checkpoint"
FORMAT_VERSION = 2
KEYS = ("model", "architecture", "optimizer", "schedule", "epoch", "step", "partial", "history",
        "config", "data", "world_size")
# What format 1 lacks, it implies: MNIST's images, checkpoints only at the ends of epochs, and
# runs without the options that came later (so that --resume says it when it now applies them).
MNIST = dict(in_shape=[1, 28, 28], num_classes=10)
_BEFORE_STEPS = dict(step=0, partial=dict(loss_sum=0.0, seconds=0.0))
_BEFORE_OPTIONS = dict(kernels="numpy", shift=0, flip=False)
_RESERVED = ("__int_keys__", MARKER)


def _write(group, tree):
    if tree and all(isinstance(k, int) for k in tree):
        group.attrs["__int_keys__"] = True      # optimizer state is keyed by parameter position
    for key, value in tree.items():
        key = str(key)
        if isinstance(value, dict) and not _plain(value):
            _write(group.create_group(key), value)
        elif isinstance(value, np.ndarray):
            group.create_dataset(key, data=value)
        else:
            group.attrs[key] = json.dumps(value, default=lambda v: v.item())


def _plain(tree):
    """Whether `tree` holds no array and only string keys: then it is one JSON attribute, which
    reads back the same, instead of a group of attributes: HDF5 objects are slow to make, and
    most of a checkpoint's tree is such small dicts."""
    return all(isinstance(k, str) and (_plain(v) if isinstance(v, dict) else
                                       not isinstance(v, np.ndarray)) for k, v in tree.items())


def _read(group):
    tree = {k: (_read(v) if isinstance(v, h5py.Group) else v[()]) for k, v in group.items()}
    tree = {k: (np.asarray(v) if not isinstance(v, dict) else v) for k, v in tree.items()}
    tree.update((k, json.loads(v)) for k, v in group.attrs.items() if k not in _RESERVED)
    if group.attrs.get("__int_keys__", False):
        tree = {int(k): v for k, v in tree.items()}
    return tree


def save(path, tree):
    """Write `tree` to `path` whole or not at all: the HDF5 image is built in memory (a few MB
    for these models), then written and synced under a temporary name and renamed over the
    previous checkpoint. A failed write (a full disk, a quota, a vanished folder) is an
    OutputError, and the previous checkpoint stays as it was."""
    image = io.BytesIO()
    with h5py.File(image, "w") as f:
        f.attrs[MARKER] = FORMAT_VERSION
        _write(f, tree)
    write_bytes(path, image.getbuffer())


def load(path):
    """The tree written by `save`; CheckpointError (one line naming `path`) for a file that is
    missing, unreadable, not a checkpoint, damaged, or holding NaN or inf weights."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: checkpoint not found")
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder, not a checkpoint")
    if not os.path.isfile(path):        # a FIFO would block the read below for ever
        raise CheckpointError(f"{path} is not a plain file (a device, FIFO or socket)")
    try:
        with open(path, "rb") as f:
            is_hdf5 = f.read(8) == b"\x89HDF\r\n\x1a\n"
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read checkpoint ({e.strerror})") from None
    if not is_hdf5:
        raise CheckpointError(f"{path}: not a ddl checkpoint (not an HDF5 file)")
    try:
        with h5py.File(path, "r") as f:
            version = f.attrs.get(MARKER)
            if version is None:
                what = "a dataset" if "train" in f else f"no '{MARKER}' attribute"
                raise CheckpointError(f"{path}: not a ddl checkpoint ({what})")
            if version not in (1, FORMAT_VERSION):
                raise CheckpointError(f"{path}: checkpoint format {version}, but this ddl reads "
                                      f"formats 1 and {FORMAT_VERSION}")
            tree = _read(f)
            if version == 1:             # (copies: the caller may change what it gets)
                tree = dict(copy.deepcopy(_BEFORE_STEPS), **tree)
                tree["architecture"] = dict(copy.deepcopy(MNIST), model=tree["config"]["model"])
                tree["config"] = dict(_BEFORE_OPTIONS, **tree["config"])
                tree["data"] = dict(tree["data"], shape=list(MNIST["in_shape"]),
                                    mean=[tree["data"]["mean"]], std=[tree["data"]["std"]])
    except CheckpointError:
        raise
    except Exception as e:      # whatever a damaged file makes h5py or json raise
        raise CheckpointError(f"{path}: damaged checkpoint ({one_line(e)})") from None
    missing = [k for k in KEYS if k not in tree]
    if missing or not isinstance(tree["model"], dict):
        raise CheckpointError(f"{path}: damaged checkpoint (no {', '.join(missing) or 'model'})")
    # Before checkpoints recorded their data file and its class names and fingerprint: the
    # --data the run was given (relative to where it ran; data/mnist.h5 by default then), and
    # nothing to compare by.
    tree["data"] = dict(dict(path=tree["config"].get("data", "data/mnist.h5"), class_names=None,
                             fingerprint=None), **tree["data"])
    tree["config"].setdefault("subset_draw", "first")   # --subset took the first rows then
    if not all(np.isfinite(v).all() for v in tree["model"].values()):
        raise CheckpointError(f"{path}: holds NaN or inf weights (saved by a run that diverged)")
    return tree


class Lock:
    """An exclusive flock on `PATH.lock`, held while a job may write output PATH (the checkpoint,
    or any other output of a run, named by `option` in messages), so that a second job is refused
    instead of overwriting or interleaving with the first one's. The file names its holder and is
    removed on release; one left behind by a killed job holds no lock (the kernel drops a flock
    with its process). It is opened without following a symbolic link and must be a plain file of
    one name, so that nothing planted at PATH.lock is truncated or written through. Use as a
    context manager, or call `release()`."""

    def __init__(self, path, option="--checkpoint"):
        self.path, self.option = f"{os.fspath(path)}.lock", option
        try:
            self.fd = self._take(path)
            os.ftruncate(self.fd, 0)
            os.write(self.fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        except OSError as e:            # a full disk, a read-only folder, a link planted there
            if hasattr(self, "fd"):
                self.release()
            reason = ("a symbolic link: remove it" if e.errno == errno.ELOOP else e.strerror)
            raise CheckpointError(f"{path}: cannot create the lock file {self.path} "
                                  f"({reason})") from None

    def _take(self, path):
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
                os.close(fd)
                raise CheckpointError(f"{path}: the lock file {self.path} is not a plain file of "
                                      f"its own (a link to another file?): remove it")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise CheckpointError(f"{path} is being written by another job ({holder}): "
                                      f"wait for it to end, or choose another {self.option}"
                                      ) from None
            # The previous holder may have removed the file between our open and our flock:
            # then we hold a lock nobody else can see, so start again on the current file.
            if _names(fd, self.path):
                return fd
            os.close(fd)

    def release(self):
        try:
            os.unlink(self.path)        # while still held: nobody can take the doomed file
        except FileNotFoundError:       # its folder vanished; the training error says so
            pass
        os.close(self.fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _names(fd, path):
    """Whether `path` still names the file open as `fd`."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False

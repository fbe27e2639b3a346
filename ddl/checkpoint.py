"""Atomic HDF5 checkpoints: nested dicts of arrays and plain values, one group per dict.

A checkpoint holds `model` (the state_dict), `optimizer`, `schedule`, `epoch`, `config` and the
metrics `history`. The sampler and the dropout generators need no state of their own: both are
derived from (seed, epoch, rank) at the start of each epoch, so (config.seed, epoch) is their state.
"""
import json
import os

import h5py
import numpy as np

from ddl.atomic import replacing

FORMAT_VERSION = 1
_RESERVED = ("__int_keys__", "format_version")


class CheckpointError(ValueError):
    pass


def _write(group, tree):
    if tree and all(isinstance(k, int) for k in tree):
        group.attrs["__int_keys__"] = True      # optimizer state is keyed by parameter position
    for key, value in tree.items():
        key = str(key)
        if isinstance(value, dict):
            _write(group.create_group(key), value)
        elif isinstance(value, np.ndarray):
            group.create_dataset(key, data=value)
        else:
            group.attrs[key] = json.dumps(value, default=lambda v: v.item())


def _read(group):
    tree = {k: (_read(v) if isinstance(v, h5py.Group) else v[()]) for k, v in group.items()}
    tree = {k: (np.asarray(v) if not isinstance(v, dict) else v) for k, v in tree.items()}
    tree.update((k, json.loads(v)) for k, v in group.attrs.items() if k not in _RESERVED)
    if group.attrs.get("__int_keys__", False):
        tree = {int(k): v for k, v in tree.items()}
    return tree


def save(path, tree):
    """Write `tree` to `path` through a temporary file and a rename: a crash mid-write leaves the
    previous checkpoint intact."""
    with replacing(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["format_version"] = FORMAT_VERSION
        _write(f, tree)


def load(path):
    """The tree written by `save`; CheckpointError (one line) if `path` is not such a checkpoint."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format_version") != FORMAT_VERSION:
                raise CheckpointError(
                    f"{path}: not a ddl checkpoint (format version "
                    f"{f.attrs.get('format_version')!r}, expected {FORMAT_VERSION})")
            return _read(f)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read checkpoint ({e})") from None


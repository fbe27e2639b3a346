"""`ddl prepare`: an image classification set into the HDF5 file that training reads.

The sources (read by ddl/sources.py): MNIST's IDX gzip files and others in their layout
(`--raw DIR`), an .npz archive of x_train, y_train, x_test, y_test (`--npz FILE`), and images in
the ImageFolder layout (`--image-folder DIR`).

Output schema (format_version 2; ddl/data.py reads it, and format 1, MNIST's earlier files):
    /train/images  uint8 (N, C, H, W)      /train/labels  uint8 (N,) (uint16 past 256 classes)
    /test/images   uint8 (M, C, H, W)      /test/labels   likewise
    attrs: format_version, dataset (a name), source ("idx", "npz" or "image-folder"), num_classes,
           class_names (index = label), mean and std float64 (C,) (each channel of the training
           pixels, scaled to [0, 1]), and md5_<file> per IDX source file

The writer streams: chunks of images go from the source into the file, the statistics counted on
the way, so a set larger than memory converts. The file is written under a temporary name and
renamed into place, so a run that fails or is killed never leaves a half-written file that a later
training run would take for a good one, and a full disk keeps the previous file.
"""
import os
import time

import h5py
import numpy as np

from ddl.atomic import remove_leftovers, same_file, streaming
from ddl.checkpoint import Lock
from ddl.data import FORMAT_VERSION
from ddl.errors import PrepareError, UsageError, dims, one_line

# Rows per HDF5 chunk: about this many bytes (1,337 MNIST images). Uncompressed: the loader reads
# every epoch, and gzip chunks made a full read of MNIST's training images several times slower
# to save space on a file that is small plain.
CHUNK_BYTES = 1 << 20


def prepare(source, out_path, log=print):
    """Write `source` (a ddl.sources.Source) to the HDF5 file `out_path`; return a summary dict:
    path, dataset, train and test (row counts), shape (C, H, W), classes, mean and std (lists,
    per channel), seconds."""
    start = time.perf_counter()
    _check_source(source)
    folder = os.path.dirname(os.path.abspath(out_path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise PrepareError(f"{out_path}: cannot create folder {folder} ({e.strerror})") from None
    shape = source.splits["train"].shape
    labels_dtype = np.min_scalar_type(len(source.class_names) - 1)
    remove_leftovers(out_path)          # a killed conversion's temporary file, a data set's size
    # (the lock: no second conversion writes the file meanwhile)
    with Lock(out_path, "--out"), streaming(out_path) as sink, h5py.File(sink, "w") as f:
        for name, split in source.splits.items():
            counts = _write_split(f.create_group(name), split, labels_dtype, sink)
            if name == "train":
                mean, std = _pixel_stats(counts)
        f.attrs.update({**source.attrs, "format_version": FORMAT_VERSION,
                        "num_classes": len(source.class_names),
                        "class_names": np.array(source.class_names, dtype=h5py.string_dtype()),
                        "mean": mean, "std": std})
    summary = {"path": str(out_path), "dataset": source.attrs["dataset"],
               "train": len(source.splits["train"].labels),
               "test": len(source.splits["test"].labels), "shape": shape,
               "classes": len(source.class_names), "mean": mean.tolist(), "std": std.tolist(),
               "seconds": time.perf_counter() - start}
    log(f"wrote {summary['path']}: {summary['train']:,} train + {summary['test']:,} test images "
        f"of {dims(shape)}, {summary['classes']} classes, mean "
        f"{_floats(mean)} std {_floats(std)}, {summary['seconds']:.2f} s")
    return summary


def _check_source(source):
    """PrepareError for a set that no model can learn from or be tested on: an empty split,
    images of no pixels, fewer than two classes (in the class names or among the training
    labels)."""
    where = source.attrs.get("dataset", "the source")
    shape = source.splits["train"].shape
    if 0 in shape:
        raise PrepareError(f"{where}: images of {dims(shape)}, no pixels")
    for name, split in source.splits.items():
        if len(split.labels) == 0:
            raise PrepareError(f"{where}: the {name} split holds no images")
    if len(source.class_names) < 2 or len(np.unique(source.splits["train"].labels)) < 2:
        raise PrepareError(f"{where}: the training images hold a single class: a classifier "
                           f"needs two at least")


def check_out(path, inputs=()):
    """UsageError unless `path` may become the data file, checked before any work: not a folder,
    nor an existing file of another kind (a checkpoint, anything but a file of `ddl prepare`:
    never replaced), nor one of `inputs` ((option, path) pairs, by real path and by inode) or
    inside an input folder (where a later conversion would read it as an input)."""
    if os.path.isdir(path):
        raise UsageError(f"--out {path} is a folder, not a file")
    real = os.path.realpath(path)
    for option, used in inputs:
        if os.path.isdir(used):
            if real.startswith(os.path.join(os.path.realpath(used), "")):
                raise UsageError(f"--out {path} is inside {option} {used}: choose a path "
                                 f"outside it")
        elif same_file(path, used):
            raise UsageError(f"--out {path} is the same file as {option} {used}: choose "
                             f"another path")
    if os.path.lexists(path):
        kind = _kind(path)
        if kind:
            raise UsageError(f"--out {path} exists and is {kind}, not a data file of `ddl "
                             f"prepare`: it is never replaced; choose another path")


def _kind(path):
    """What the existing `path` is if not a data file of `ddl prepare` ("a checkpoint", "not an
    HDF5 file", ...), else None."""
    if os.path.islink(path) and not os.path.exists(path):
        return "a broken symbolic link"
    if not os.path.isfile(path):
        return "not a plain file"
    try:
        if not h5py.is_hdf5(path):
            return "not an HDF5 file"
        with h5py.File(path, "r") as f:
            if "ddl_checkpoint" in f.attrs:
                return "a ddl checkpoint"
            if "format_version" not in f.attrs:
                return "an HDF5 file of another program"
    except OSError as e:
        return f"unreadable ({e.strerror or one_line(e)})"
    return None


def _floats(values):
    return "/".join(f"{v:.4f}" for v in values)


def _write_split(group, split, labels_dtype, sink):
    """Stream `split` into `group` (images chunked along rows, labels as `labels_dtype`); return
    its pixel counts (C, 256) per channel. Stops at the first failed write (see Sink)."""
    n, shape = len(split.labels), split.shape
    rows = min(n, max(1, CHUNK_BYTES // int(np.prod(shape))))
    images = group.create_dataset("images", (n, *shape), np.uint8, chunks=(rows, *shape))
    group.create_dataset("labels", data=split.labels.astype(labels_dtype), chunks=(rows,))
    counts = np.zeros((shape[0], 256), np.int64)
    done = 0
    for chunk in split.chunks(rows):
        images[done:done + len(chunk)] = chunk
        for c in range(shape[0]):
            counts[c] += np.bincount(chunk[:, c].ravel(), minlength=256)
        done += len(chunk)
        sink.check()
    return counts


def _pixel_stats(counts):
    """Mean and std per channel (C,) of pixels scaled to [0, 1], exact, from their counts (C, 256)
    of each value: no float copy of the images is ever made. A channel whose pixels are all alike
    (an opaque alpha channel) gets std 1, so that it normalises to 0 rather than to 0 / 0."""
    values = np.arange(256) / 255.0
    total = counts.sum(axis=1)
    mean = counts @ values / total
    std = np.sqrt((counts * (values - mean[:, None]) ** 2).sum(axis=1) / total)
    return mean, np.where(std > 0, std, 1.0)

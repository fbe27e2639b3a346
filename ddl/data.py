"""Reading the prepared HDF5 file (see ddl/prepare.py): a dataset, a sampler that shards it across
ranks, and a loader that serves one rank's batches.
"""
import os
import queue
import threading

import h5py
import numpy as np

from ddl.errors import DataError

# One HDF5 read covers at most this many bytes of rows: few calls, a bounded temporary buffer.
READ_BLOCK_BYTES = 4 << 20
PREFETCH_DEPTH = 2  # batches the loader's thread may run ahead of training
# What `ddl prepare` writes (the schema is in ddl/prepare.py), and what this reader takes: format 1,
# MNIST's files from before ddl took other images, is format 2 with one channel, a scalar mean and
# std, and no class names.
FORMAT_VERSION = 2
READS = (1, 2)


class H5Dataset:
    """One split ("train" or "test") of a prepared HDF5 file, opened read-only and validated.

    Attributes: n (rows), image_shape (C, H, W), num_classes, class_names (num_classes strings),
    mean and std float64 (C,) (each channel of the training pixels scaled to [0, 1]), labels int64
    (n,) (all labels, read once to validate them).
    """

    def __init__(self, path, split):
        self.path, self.split = os.fspath(path), split
        if not os.path.isfile(self.path):
            raise DataError(f"{self.path}: no such file (run `ddl prepare` to create it)")
        if not h5py.is_hdf5(self.path):
            raise DataError(f"{self.path}: not an HDF5 file")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as e:
            raise DataError(f"{self.path}: cannot open ({e})") from None
        try:
            self._validate()
        except BaseException:
            self._file.close()
            raise

    def _validate(self):
        version = self._file.attrs.get("format_version")
        if version not in READS:
            rebuild = "rebuild it with `ddl prepare`"
            if version is None:
                raise self._error(f"no 'format_version' attribute: not a file of `ddl prepare` "
                                  f"({rebuild})")
            newer = isinstance(version, (int, np.integer)) and version > FORMAT_VERSION
            raise self._error(f"format_version {version}, but this ddl reads formats "
                              f"{' and '.join(map(str, READS))} ("
                              + ("upgrade ddl, or " if newer else "") + f"{rebuild})")
        group = self._file.get(self.split)
        if not isinstance(group, h5py.Group):
            raise self._error(f"no group '{self.split}'")
        for name, kinds, expected in (("images", "u", "uint8"), ("labels", "ui", "integers")):
            ds = group.get(name)
            if not isinstance(ds, h5py.Dataset):
                raise self._error(f"no dataset '{self.split}/{name}'")
            if ds.dtype.kind not in kinds or (name == "images" and ds.dtype != np.uint8):
                raise self._error(f"'{self.split}/{name}' has dtype {ds.dtype}, expected "
                                  f"{expected}")
        self._images, labels = group["images"], group["labels"]
        if self._images.ndim != 4:
            raise self._error(f"'{self.split}/images' has shape {self._images.shape}, "
                              f"expected (N, C, H, W)")
        if labels.ndim != 1 or len(labels) != len(self._images):
            raise self._error(f"'{self.split}/labels' has shape {labels.shape}, "
                              f"expected ({len(self._images)},) to match the images")
        attrs = self._file.attrs
        for key in ("mean", "std", "num_classes"):
            if key not in attrs:
                raise self._error(f"attribute '{key}' missing")
        self.n, self.image_shape = len(self._images), self._images.shape[1:]
        channels = self.image_shape[0]
        self.mean, self.std = (np.atleast_1d(np.asarray(attrs[k], np.float64)) for k in
                               ("mean", "std"))
        if self.mean.shape != (channels,) or self.std.shape != (channels,):
            raise self._error(f"'{self.split}/images' have {channels} channel(s), but the "
                              f"attributes mean and std hold {self.mean.size} and "
                              f"{self.std.size} values (one per channel of the training images)")
        if not (np.isfinite(self.mean).all() and np.isfinite(self.std).all()
                and (self.std > 0).all()):
            raise self._error(f"bad normalisation attributes mean={self.mean.tolist()} "
                              f"std={self.std.tolist()}")
        # Per channel, as (C, 1, 1) factors: (x / 255 - mean) / std = x * scale - shift.
        self._scale = (1.0 / (255.0 * self.std)).astype(np.float32)[:, None, None]
        self._shift = (self.mean / self.std).astype(np.float32)[:, None, None]
        self.num_classes = int(attrs["num_classes"])
        self.class_names = [str(name) for name in
                            attrs.get("class_names", range(self.num_classes))]
        if len(self.class_names) != self.num_classes:
            raise self._error(f"attribute 'class_names' holds {len(self.class_names)} names for "
                              f"{self.num_classes} classes")
        self.labels = labels[...].astype(np.int64)
        bad = np.flatnonzero((self.labels < 0) | (self.labels >= self.num_classes))
        if bad.size:
            raise self._error(f"'{self.split}/labels' row {bad[0]} is {self.labels[bad[0]]}, "
                              f"outside 0..{self.num_classes - 1}")
        self._block_rows = max(1, READ_BLOCK_BYTES // max(1, int(np.prod(self.image_shape))))

    def _error(self, problem):
        return DataError(f"{self.path}: {problem}")

    def __len__(self):
        return self.n

    def read_raw(self, rows):
        """Images uint8 (k, C, H, W) and labels int64 (k,) of the sorted row indices `rows` (k,).

        Rows are grouped by aligned blocks of READ_BLOCK_BYTES; each touched block is one slice
        read, from its first to its last wanted row, and the wanted rows are picked in memory.
        h5py fancy indexing instead makes one selection per row, far slower (the README says how
        much).
        """
        rows = self._check_rows(rows)
        images = np.empty((len(rows),) + self.image_shape, np.uint8)
        if len(rows):
            cuts = np.flatnonzero(np.diff(rows // self._block_rows)) + 1
            for start, group in zip(np.r_[0, cuts], np.split(rows, cuts)):
                lo = group[0]
                images[start:start + len(group)] = self._images[lo:group[-1] + 1][group - lo]
        return images, self.labels[rows]

    def read(self, rows):
        """Normalised images float32 (k, C, H, W) and labels int64 (k,) of sorted `rows` (k,)."""
        images, labels = self.read_raw(rows)
        return self.normalize(images), labels

    def normalize(self, images):
        """uint8 (k, C, H, W) -> float32 (k, C, H, W): (x / 255 - mean[c]) / std[c]."""
        out = images.astype(np.float32)
        out *= self._scale
        out -= self._shift
        return out

    def _check_rows(self, rows):
        rows = np.asarray(rows)
        if rows.ndim != 1 or not (rows.size == 0 or np.issubdtype(rows.dtype, np.integer)):
            raise ValueError(f"rows must be a 1-D integer array, got {rows.dtype} {rows.shape}")
        rows = rows.astype(np.int64)
        if rows.size and (rows[0] < 0 or rows[-1] >= self.n or np.any(np.diff(rows) < 0)):
            raise ValueError(f"rows must be sorted and within 0..{self.n - 1}")
        return rows

    def close(self):
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (f"H5Dataset({self.path!r}, {self.split!r}, n={self.n}, "
                f"image_shape={self.image_shape})")


class DistributedSampler:
    """Which rows each rank takes, batch by batch; `batch_size` is the GLOBAL batch B.

    Training (drop_last=True): each epoch draws one permutation of range(n) seeded by (seed, epoch),
    the same on every rank. Global batch k is perm[k*B:(k+1)*B] and rank r takes its r-th contiguous
    slice of B / world_size rows. A global batch therefore does not depend on world_size: N ranks
    take exactly the steps of one process with batch B. Every rank has n // B batches; the n % B
    leftover rows (different ones each epoch) are dropped.

    Evaluation (drop_last=False, usually shuffle=False): rank r takes the r-th of world_size
    near-equal contiguous blocks of the order (np.array_split), cut into batches of B / world_size
    (the last one shorter). Every row is counted exactly once, without padding duplicates; block
    sizes differ by at most one row, so batch counts may differ by one, which evaluation tolerates
    because it all-reduces its sums only after the loop.

    `rows` (n,), e.g. a `subset_rows` draw: the dataset rows that order positions 0..n-1 stand
    for (default: the rows 0..n-1 themselves).
    """

    def __init__(self, n, world_size, rank, batch_size, seed=0, shuffle=True, drop_last=True,
                 rows=None):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        if batch_size < 1 or batch_size % world_size:
            raise ValueError(f"global batch_size {batch_size} must be a positive multiple of "
                             f"world_size {world_size}")
        if drop_last and batch_size > n:
            raise ValueError(f"global batch_size {batch_size} exceeds the dataset's {n} rows: "
                             f"with drop_last there would be no batch at all")
        self.n, self.world_size, self.rank = n, world_size, rank
        self.batch_size, self.local_batch_size = batch_size, batch_size // world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch, self.start = 0, 0
        self.rows = None if rows is None else np.asarray(rows, np.int64)

    def set_epoch(self, epoch, start=0):
        """Serve epoch `epoch` from its batch number `start` on (a run resumed mid-epoch): the
        global batches, and so the trajectory, are those of an epoch served whole."""
        self.epoch, self.start = int(epoch), int(start)

    def batches(self):
        """This rank's batches for the current epoch from `start` on: a list of row-index arrays,
        in order (len(self) - start of them)."""
        order = (np.random.default_rng((self.seed, self.epoch)).permutation(self.n)
                 if self.shuffle else np.arange(self.n))
        if self.rows is not None:
            order = self.rows[order]
        b = self.local_batch_size
        if self.drop_last:
            steps = self.n // self.batch_size
            grid = order[:steps * self.batch_size].reshape(steps, self.world_size, b)
            return list(grid[self.start:, self.rank])
        mine = np.array_split(order, self.world_size)[self.rank]
        return [mine[i:i + b] for i in range(0, len(mine), b)][self.start:]

    def indices(self):
        """This rank's shard of the current epoch from `start` on, in batch order."""
        return np.concatenate(self.batches() or [np.empty(0, np.int64)])

    def __len__(self):
        if self.drop_last:
            return self.n // self.batch_size
        rows = self.n // self.world_size + (self.rank < self.n % self.world_size)
        return -(-rows // self.local_batch_size)

    def __iter__(self):
        return iter(self.batches())


SUBSET_DRAWS = ("stratified", "random", "first")


def subset_rows(labels, n, seed, draw="stratified"):
    """The sorted rows (n,) of a subset of the rows of `labels` (N,) drawn by `draw`:
    "stratified", every class in its share of the whole (largest remainders to the classes the
    rounding shorted most, ties to the lower class) and its rows at random within it; "random",
    uniformly at random; "first", the first n (a file's prefix: what --subset took before it
    drew, kept for the checkpoints of then; a folder written class by class gives few classes).
    The draws are seeded by `seed` alone: the same on every rank and at any world size."""
    total = len(labels)
    if draw == "first" or n >= total:
        return np.arange(min(n, total))
    rng = np.random.default_rng((seed, 7))
    if draw == "random":
        return np.sort(rng.choice(total, n, replace=False))
    classes, counts = np.unique(labels, return_counts=True)
    share = counts * n / total
    take = np.floor(share).astype(np.int64)
    short = np.argsort(-(share - take), kind="stable")[:n - take.sum()]
    take[short] += 1
    picked = [rng.choice(np.flatnonzero(labels == k), m, replace=False)
              for k, m in zip(classes, take)]
    return np.sort(np.concatenate(picked))


class Loader:
    """One rank's batches `(x float32 (b, C, H, W), y int64 (b,))`, in the sampler's order.

    Each epoch first reads the rank's whole shard (its sorted rows, in few block reads) into a
    uint8 array, so memory per rank is its shard, not the dataset, and HDF5 never sees a scattered
    per-batch read. Batches are then gathered from it, augmented and normalised one at a time. With
    prefetch, a daemon thread does that work up to PREFETCH_DEPTH batches ahead of training.

    Augmentation (training): `shift` moves each image by up to that many pixels each way (the
    uncovered border is black), `flip` mirrors half of them left to right. The draws come from
    (sampler seed, epoch, row): the same on any number of ranks, and again on resume.
    """

    def __init__(self, dataset, sampler, prefetch=True, shift=0, flip=False):
        self.dataset, self.sampler, self.prefetch = dataset, sampler, prefetch
        self.shift, self.flip = shift, flip

    def __len__(self):
        return len(self.sampler)

    def set_epoch(self, epoch, start=0):
        self.sampler.set_epoch(epoch, start)

    def __iter__(self):
        # The epoch is fixed now, not when the generator first runs.
        batches = self._epoch(self.sampler.batches(), self.sampler.epoch)
        return _prefetch(batches) if self.prefetch else batches

    def _epoch(self, batches, epoch):
        rows = np.unique(np.concatenate(batches or [np.empty(0, np.int64)]))
        images, labels = self.dataset.read_raw(rows)
        # One draw per row of the whole set, so that a row's draw does not depend on the shard.
        rng = np.random.default_rng((self.sampler.seed, epoch, 1))
        n = self.dataset.n
        shifts = rng.integers(-self.shift, self.shift + 1, (n, 2)) if self.shift else None
        flips = rng.random(n) < 0.5 if self.flip else None
        for batch in batches:
            where = np.searchsorted(rows, batch)
            x = images[where]
            if shifts is not None:
                x = translate(x, shifts[batch], self.shift)
            if flips is not None:
                mirrored = flips[batch]
                x[mirrored] = x[mirrored, :, :, ::-1]
            yield self.dataset.normalize(x), labels[where]


def translate(images, moves, reach):
    """images (k, C, H, W) moved by `moves` (k, 2) pixels (down, right), each within
    [-reach, reach]; the uncovered border is 0. A new array."""
    k, c, h, w = images.shape
    padded = np.zeros((k, c, h + 2 * reach, w + 2 * reach), images.dtype)
    padded[:, :, reach:reach + h, reach:reach + w] = images
    windows = np.lib.stride_tricks.sliding_window_view(padded, (h, w), axis=(2, 3))
    # windows[i, :, r, q] is the (C, H, W) crop from (r, q): image i moved by (reach - r, reach - q)
    return windows[np.arange(k), :, reach - moves[:, 0], reach - moves[:, 1]]


def _prefetch(items):
    """Yield from the iterator `items`, which a daemon thread runs up to PREFETCH_DEPTH ahead.

    An exception raised in the thread is re-raised here. Closing this generator (a `break`, or its
    garbage collection) stops the thread and joins it, so an abandoned epoch leaves nothing behind.
    """
    q, stop = queue.Queue(PREFETCH_DEPTH), threading.Event()
    thread = threading.Thread(target=_produce, args=(items, q, stop), name="ddl-prefetch",
                              daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "error":
                raise value
            if kind == "end":
                return
            yield value
    finally:
        stop.set()
        thread.join()


def _produce(items, q, stop):
    def put(message):
        # A plain blocking put would hang forever once the consumer has gone: poll `stop`.
        while not stop.is_set():
            try:
                q.put(message, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    try:
        for item in items:
            if not put(("item", item)):
                return
        put(("end", None))
    except BaseException as e:  # handed to the consumer, which re-raises it
        put(("error", e))

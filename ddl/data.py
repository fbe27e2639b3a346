"""Reading the prepared HDF5 file (see ddl/prepare.py): a dataset, a sampler that shards it across
ranks, and a loader that serves one rank's batches.
"""
import os
import queue
import threading

import h5py
import numpy as np

from ddl.errors import DataError, dims

# Wanted rows this close (gap in bytes) are read in one HDF5 call, the rows between them read and
# dropped: copying 64 KiB costs about what one more call does (docs/streaming.md).
READ_GAP_BYTES = 64 << 10
# No HDF5 chunk cache: a read of a row of an uncompressed chunk then copies that row alone, where a
# cache that holds the chunk (1 MiB, the default size) would first read all of its 1,337 MNIST
# rows: tens of times slower for a random batch (docs/streaming.md).
CHUNK_CACHE_BYTES = 0
PREFETCH_DEPTH = 2  # batches the loader's thread may run ahead of training
DRAW_BLOCK = 1 << 16  # rows whose augmentation draws are made at once (a bounded temporary)
# What `ddl prepare` writes (the schema is in ddl/prepare.py), and what this reader takes: format 1,
# MNIST's files from before ddl took other images, is format 2 with one channel, a scalar mean and
# std, and no class names.
FORMAT_VERSION = 2
READS = (1, 2)


# Labels are uint8, or uint16 past 256 classes (ddl/prepare.py): more classes than that is a
# damaged attribute, not a data set, and would size the output layer by it.
MAX_CLASSES = 1 << 16


def _shown(value):
    """An attribute's value in a message, cut short."""
    text = repr(value.tolist() if isinstance(value, np.ndarray) else value)
    return text if len(text) <= 40 else text[:37] + "..."


def _unwritten(ds):
    """Whether uncompressed dataset `ds` has less storage in the file than its shape declares:
    reading it would make up rows (and allocate for them) that were never written."""
    unfiltered = ds.id.get_create_plist().get_nfilters() == 0
    return unfiltered and ds.id.get_storage_size() < ds.nbytes


class H5Dataset:
    """One split ("train" or "test") of a prepared HDF5 file, opened read-only and validated.

    Attributes: n (rows), image_shape (C, H, W), num_classes, class_names (num_classes strings),
    mean and std float64 (C,) (each channel of the training pixels scaled to [0, 1]), labels (n,)
    (all labels, as stored: an integer type of 1 or 2 bytes from `ddl prepare`, read once to
    validate them; read_raw gives them as int64). Images stay in the file: read_raw reads rows.
    """

    def __init__(self, path, split):
        self.path, self.split = os.fspath(path), split
        if not os.path.exists(self.path):
            raise DataError(f"{self.path}: no such file (run `ddl prepare` to create it)")
        if not os.path.isfile(self.path):   # a FIFO would block the reads below for ever
            raise DataError(f"{self.path}: not a plain file")
        if not h5py.is_hdf5(self.path):
            raise DataError(f"{self.path}: not an HDF5 file")
        try:
            self._file = h5py.File(self.path, "r", rdcc_nbytes=CHUNK_CACHE_BYTES)
        except OSError as e:
            raise DataError(f"{self.path}: cannot open ({e})") from None
        try:
            self._validate()
        except BaseException:
            self._file.close()
            raise

    def _validate(self):
        version = self._integer("format_version", None)
        if version not in READS:
            rebuild = "rebuild it with `ddl prepare`"
            if version is None:
                raise self._error(f"no 'format_version' attribute: not a file of `ddl prepare` "
                                  f"({rebuild})")
            newer = version > FORMAT_VERSION
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
        if self.n == 0:
            raise self._error(f"'{self.split}' holds no images")
        if 0 in self.image_shape:
            raise self._error(f"'{self.split}/images' are {dims(self.image_shape)}: no pixels")
        for ds in (self._images, labels):
            if _unwritten(ds):
                raise self._error(f"'{ds.name[1:]}' declares {ds.shape} but its data is not all "
                                  f"in the file (damaged, or not written by `ddl prepare`)")
        channels = self.image_shape[0]
        self.mean, self.std = (self._floats(k) for k in ("mean", "std"))
        if self.mean.shape != (channels,) or self.std.shape != (channels,):
            raise self._error(f"'{self.split}/images' have {channels} channel(s), but the "
                              f"attributes mean and std hold {self.mean.size} and "
                              f"{self.std.size} values (one per channel of the training images)")
        if not (np.isfinite(self.mean).all() and np.isfinite(self.std).all()
                and (self.std > 0).all()):
            raise self._error(f"bad normalisation attributes mean={self.mean.tolist()} "
                              f"std={self.std.tolist()}")
        self.normalize = normalizer(self.mean, self.std)
        self.num_classes = self._integer("num_classes", (2, MAX_CLASSES))
        names = attrs.get("class_names", range(self.num_classes))
        if not (isinstance(names, range) or (isinstance(names, np.ndarray) and names.ndim == 1
                                              and names.dtype.kind in "OSU")):
            raise self._error("attribute 'class_names' is not a list of names")
        self.class_names = [name.decode(errors="backslashreplace") if isinstance(name, bytes)
                            else str(name) for name in names]
        if len(self.class_names) != self.num_classes:
            raise self._error(f"attribute 'class_names' holds {len(self.class_names)} names for "
                              f"{self.num_classes} classes")
        self.labels = labels[...]
        bad = np.flatnonzero((self.labels < 0) | (self.labels >= self.num_classes))
        if bad.size:
            raise self._error(f"'{self.split}/labels' row {bad[0]} is {self.labels[bad[0]]}, "
                              f"outside 0..{self.num_classes - 1}")
        self._row_bytes = int(np.prod(self.image_shape))
        self._gap_rows = READ_GAP_BYTES // max(1, self._row_bytes)
        self._fd, self._chunk_rows, self._offsets = self._direct()

    def _direct(self):
        """Where rows lie in the file, for reading them with pread: (file descriptor, rows per
        chunk, file offset of each chunk), or (None, 0, None) where HDF5 must read them: the
        images compressed or filtered, in another file, or not all written.

        An HDF5 read of a row costs about 3 times a pread (h5py's selections, the chunk index),
        and holds the GIL that training needs; a pread lets it go (docs/streaming.md). `ddl
        prepare` writes uncompressed chunks of whole rows; a contiguous dataset is one chunk.
        """
        images, none = self._images, (None, 0, None)
        plist = images.id.get_create_plist()
        if plist.get_nfilters() or plist.get_external_count() or self.n == 0:
            return none
        try:
            fd = self._file.id.get_vfd_handle()
        except (OSError, ValueError, TypeError):     # a driver without a file descriptor
            return none
        if plist.get_layout() == h5py.h5d.CONTIGUOUS:
            offset = images.id.get_offset()
            return none if offset is None else (fd, self.n, np.array([offset]))
        if (plist.get_layout() != h5py.h5d.CHUNKED or images.chunks[1:] != self.image_shape
                or not hasattr(images.id, "chunk_iter")):      # HDF5 before 1.12.3
            return none
        rows = images.chunks[0]
        offsets = np.full(-(-self.n // rows), -1, np.int64)

        def note(chunk):
            offsets[chunk.chunk_offset[0] // rows] = chunk.byte_offset
        images.id.chunk_iter(note)
        return none if (offsets < 0).any() else (fd, rows, offsets)

    def _error(self, problem):
        return DataError(f"{self.path}: {problem}")

    def _integer(self, key, bounds):
        """Attribute `key`, an integer scalar (bounds=None: any, missing: None) within `bounds`
        (low, high), both included; else DataError."""
        value = self._file.attrs.get(key)
        if value is None and bounds is None:
            return None
        if isinstance(value, np.ndarray) and value.shape in ((), (1,)):
            value = value.reshape(())[()]
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise self._error(f"attribute '{key}' is {_shown(value)}, not an integer")
        if bounds and not bounds[0] <= value <= bounds[1]:
            raise self._error(f"attribute '{key}' is {value}, outside {bounds[0]}..{bounds[1]}")
        return int(value)

    def _floats(self, key):
        """Attribute `key` as float64 (k,) of numbers; else DataError."""
        value = np.atleast_1d(self._file.attrs[key])
        if value.ndim != 1 or value.dtype.kind not in "uif":
            raise self._error(f"attribute '{key}' is {_shown(value)}, not numbers")
        return value.astype(np.float64)

    def __len__(self):
        return self.n

    def read_raw(self, rows):
        """Images uint8 (k, C, H, W) and labels int64 (k,) of the sorted row indices `rows` (k,).

        With pread (see _direct), each run of consecutive rows within a chunk is one pread into
        the result. Through HDF5, runs of rows less than READ_GAP_BYTES apart are one slice read
        each, from the run's first to its last row, the wanted rows picked in memory. h5py fancy
        indexing instead builds one selection of every row, 10 times slower on a random batch
        (docs/streaming.md).
        """
        rows = self._check_rows(rows)
        images = np.empty((len(rows),) + self.image_shape, np.uint8)
        if len(rows):
            (self._pread if self._fd is not None else self._hdf5_read)(rows, images)
        return images, self.labels[rows].astype(np.int64)

    def _pread(self, rows, out):
        chunk, first = np.divmod(rows, self._chunk_rows)
        cuts = np.flatnonzero((np.diff(rows) != 1) | (np.diff(chunk) != 0)) + 1
        starts = np.r_[0, cuts]
        at = self._offsets[chunk[starts]] + first[starts] * self._row_bytes
        view, size = memoryview(out).cast("B"), self._row_bytes
        # Python ints: most runs are one row, whose cost is then that of the system call.
        for a, b, offset in zip(starts.tolist(), cuts.tolist() + [len(rows)], at.tolist()):
            if os.preadv(self._fd, [view[a * size:b * size]], offset) != (b - a) * size:
                raise self._error(f"'{self.split}/images' row {rows[a]} lies past the end of "
                                  f"the file: it is truncated")

    def _hdf5_read(self, rows, out):
        steps = np.diff(rows)
        distinct = bool((steps > 0).all())
        cuts = (np.flatnonzero(steps > self._gap_rows) + 1).tolist()
        for a, b in zip([0] + cuts, cuts + [len(rows)]):
            lo, hi = int(rows[a]), int(rows[b - 1]) + 1
            out[a:b] = (self._images[lo:hi] if distinct and hi - lo == b - a else
                        self._images[lo:hi][rows[a:b] - lo])

    def read(self, rows):
        """Normalised images float32 (k, C, H, W) and labels int64 (k,) of sorted `rows` (k,)."""
        images, labels = self.read_raw(rows)
        return self.normalize(images), labels

    def _check_rows(self, rows):
        rows = np.asarray(rows)
        if rows.ndim != 1 or not (rows.size == 0 or np.issubdtype(rows.dtype, np.integer)):
            raise ValueError(f"rows must be a 1-D integer array, got {rows.dtype} {rows.shape}")
        rows = rows.astype(np.int64)
        if rows.size and (rows[0] < 0 or rows[-1] >= self.n or np.any(np.diff(rows) < 0)):
            raise ValueError(f"rows must be sorted and within 0..{self.n - 1}")
        return rows

    def close(self):
        self._fd = None          # the file's descriptor, which the OS may hand out again
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


def normalizer(mean, std):
    """The function uint8 (k, C, H, W) -> float32 (k, C, H, W), (x / 255 - mean[c]) / std[c],
    for per-channel statistics `mean` and `std` (C,): how a data file's images, and the image
    files `ddl predict` is given, reach a model."""
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    # Per channel, as (C, 1, 1) factors: (x / 255 - mean) / std = x * scale - shift.
    scale = (1.0 / (255.0 * std)).astype(np.float32)[:, None, None]
    shift = (mean / std).astype(np.float32)[:, None, None]

    def normalize(images):
        out = images.astype(np.float32)
        out *= scale
        out -= shift
        return out
    return normalize


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

    Each batch is read from the file when it is made: its rows in file order (see
    H5Dataset.read_raw), put back in the sampler's order, augmented and normalised. With prefetch, a
    daemon thread does that work up to PREFETCH_DEPTH batches ahead of training. Memory is a few
    batches whatever the file's size, plus 3 bytes a row for the epoch's augmentation draws (and
    the sampler's permutation, 8) (docs/streaming.md).

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
        # One draw per row of the whole set, so that a row's draw does not depend on the shard
        # or on the subset the sampler draws from.
        shifts, flips = draws(self.sampler.seed, epoch, self.dataset.n, self.shift, self.flip)
        for batch in batches:
            order = np.argsort(batch, kind="stable")
            images, labels = self.dataset.read_raw(batch[order])
            x, y = np.empty_like(images), np.empty_like(labels)
            x[order], y[order] = images, labels
            if shifts is not None:
                x = translate(x, shifts[batch].astype(np.intp), self.shift)
            if flips is not None:
                mirrored = flips[batch]
                x[mirrored] = x[mirrored, :, :, ::-1]
            yield self.dataset.normalize(x), y


def draws(seed, epoch, n, shift, flip):
    """The augmentation of every row 0..n-1 in epoch `epoch`: shifts (n, 2) (down, right) in
    [-shift, shift] of the smallest integer type that holds them, or None without shift; flips bool
    (n,), or None without flip. One generator seeded (seed, epoch, 1) draws all shifts, then all
    flips, so a row's draw does not depend on the shard. They are drawn DRAW_BLOCK rows at a time:
    the same numbers as one call for all n rows (a generator's state, any half-used 64-bit word
    included, carries over between calls), without an 8-bytes-a-number temporary of all n."""
    rng = np.random.default_rng((seed, epoch, 1))
    shifts = np.empty((n, 2), np.min_scalar_type(-shift)) if shift else None
    flips = np.empty(n, bool) if flip else None
    if shift:
        for lo in range(0, n, DRAW_BLOCK):
            shifts[lo:lo + DRAW_BLOCK] = rng.integers(-shift, shift + 1,
                                                      (min(DRAW_BLOCK, n - lo), 2))
    if flip:
        for lo in range(0, n, DRAW_BLOCK):
            flips[lo:lo + DRAW_BLOCK] = rng.random(min(DRAW_BLOCK, n - lo)) < 0.5
    return shifts, flips


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

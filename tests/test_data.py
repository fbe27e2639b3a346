"""ddl.data: H5Dataset reads and validation, DistributedSampler sharding, Loader batches and
augmentation."""
import threading
import time

import h5py
import numpy as np
import pytest

from ddl import data
from ddl.data import DataError, DistributedSampler, H5Dataset, Loader

N, SHAPE = 103, (1, 4, 5)  # a row is 20 bytes


def write_h5(path, images, labels, split="train", **attrs):
    """A prepared-style file with one split; `attrs` override format_version=2, mean=[0.5],
    std=[0.25], num_classes=10."""
    with h5py.File(path, "w") as f:
        f.attrs.update({"format_version": 2, "mean": [0.5], "std": [0.25], "num_classes": 10,
                        **attrs})
        f.create_dataset(f"{split}/images", data=images)
        f.create_dataset(f"{split}/labels", data=labels)
    return path


@pytest.fixture
def tiny(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (N,) + SHAPE, dtype=np.uint8)
    labels = rng.integers(0, 10, N).astype(np.uint8)
    return write_h5(tmp_path / "tiny.h5", images, labels), images, labels


# --- H5Dataset ----------------------------------------------------------------------------------
@pytest.mark.parametrize("gap_bytes", [0, 7 * 20, data.READ_GAP_BYTES])
def test_read_raw_returns_the_requested_rows(tiny, monkeypatch, gap_bytes):
    monkeypatch.setattr(data, "READ_GAP_BYTES", gap_bytes)  # 0: a read per run of rows in a row
    path, images, labels = tiny
    rng = np.random.default_rng(1)
    cases = [[], [0], [N - 1], [3, 3, 4], [6, 7], np.arange(N), np.arange(20, 60)]
    cases += [np.sort(rng.choice(N, k, replace=False)) for k in (2, 15, 50, 90)]
    with H5Dataset(path, "train") as ds:
        for rows in cases:
            got_images, got_labels = ds.read_raw(np.array(rows, dtype=np.int64))
            assert got_images.dtype == np.uint8 and got_labels.dtype == np.int64
            np.testing.assert_array_equal(got_images, images[rows])
            np.testing.assert_array_equal(got_labels, labels[rows])


def test_read_normalises_with_the_file_statistics(tiny):
    path, images, labels = tiny
    rows = np.array([1, 5, 50, 102])
    with H5Dataset(path, "train") as ds:
        x, y = ds.read(rows)
    assert x.dtype == np.float32 and x.shape == (4,) + SHAPE
    np.testing.assert_allclose(x, (images[rows] / 255 - 0.5) / 0.25, atol=1e-5)
    np.testing.assert_array_equal(y, labels[rows])


def test_attributes_and_close(tiny):
    path, _, labels = tiny
    with H5Dataset(path, "train") as ds:
        assert (ds.n, len(ds), ds.num_classes, ds.image_shape) == (N, N, 10, SHAPE)
        assert (ds.mean.tolist(), ds.std.tolist()) == ([0.5], [0.25])
        assert ds.class_names == [str(k) for k in range(10)]       # none in the file: numbers
        np.testing.assert_array_equal(ds.labels, labels)
        with pytest.raises(OSError, match="already open"):
            h5py.File(path, "a")
    h5py.File(path, "a").close()  # closed: a writer may open it now


@pytest.mark.parametrize("rows", [[2, 1], [-1, 3], [0, N], [[1, 2]], [0.5, 1.5]])
def test_read_rejects_bad_rows(tiny, rows):
    with H5Dataset(tiny[0], "train") as ds, pytest.raises(ValueError, match="rows must be"):
        ds.read_raw(np.array(rows))


def _replace(path, key, value):
    """Replace (or, with None, delete) the group or dataset `key`."""
    with h5py.File(path, "a") as f:
        del f[key]
        if value is not None:
            f[key] = value


def _set_attr(path, key, value):
    """Set (or, with None, delete) the file attribute `key`."""
    with h5py.File(path, "a") as f:
        if value is None:
            del f.attrs[key]
        else:
            f.attrs[key] = value


BAD_FILES = {  # name: (how to break the tiny file, words in the error)
    "missing group": (lambda p: _replace(p, "train", None), "no group 'train'"),
    "missing images": (lambda p: _replace(p, "train/images", None),
                       "no dataset 'train/images'"),
    "missing labels": (lambda p: _replace(p, "train/labels", None),
                       "no dataset 'train/labels'"),
    "float images": (lambda p: _replace(p, "train/images", np.zeros((N,) + SHAPE, np.float32)),
                     "'train/images' has dtype float32, expected uint8"),
    "float labels": (lambda p: _replace(p, "train/labels", np.zeros(N, np.float32)),
                     "'train/labels' has dtype float32, expected integers"),
    "3-D images": (lambda p: _replace(p, "train/images", np.zeros((N, 4, 5), np.uint8)),
                   "'train/images' has shape (103, 4, 5), expected (N, C, H, W)"),
    "count mismatch": (lambda p: _replace(p, "train/labels", np.zeros(N - 1, np.uint8)),
                       "'train/labels' has shape (102,), expected (103,)"),
    "label out of range": (lambda p: _replace(p, "train/labels", np.arange(N, dtype=np.uint8)),
                           "'train/labels' row 10 is 10, outside 0..9"),
    "missing mean": (lambda p: _set_attr(p, "mean", None), "attribute 'mean' missing"),
    "zero std": (lambda p: _set_attr(p, "std", 0.0), "bad normalisation attributes"),
    "std per channel": (lambda p: _set_attr(p, "std", [0.2, 0.3]),
                        "'train/images' have 1 channel(s), but the attributes mean and std hold "
                        "1 and 2 values"),
    "class names": (lambda p: _set_attr(p, "class_names", ["a", "b"]),
                    "'class_names' holds 2 names for 10 classes"),
    "no version": (lambda p: _set_attr(p, "format_version", None),
                   "no 'format_version' attribute: not a file of `ddl prepare` (rebuild it"),
    "newer": (lambda p: _set_attr(p, "format_version", 3),
              "format_version 3, but this ddl reads formats 1 and 2 (upgrade ddl, or rebuild"),
    "older": (lambda p: _set_attr(p, "format_version", 0), "format_version 0, but this ddl reads "
              "formats 1 and 2 (rebuild it with `ddl prepare`)"),
}


@pytest.mark.parametrize("breakage", BAD_FILES)
def test_bad_file_is_refused(tiny, breakage):
    breaker, words = BAD_FILES[breakage]
    breaker(tiny[0])
    with pytest.raises(DataError) as err:
        H5Dataset(tiny[0], "train")
    assert str(err.value).startswith(f"{tiny[0]}: ") and words in str(err.value)
    assert "\n" not in str(err.value)
    h5py.File(tiny[0], "a").close()  # the refused file was closed again


def test_format_1_files_still_read(tmp_path):
    """MNIST's files from before format 2: a scalar mean and std, no class names."""
    path = write_h5(tmp_path / "v1.h5", np.full((3,) + SHAPE, 255, np.uint8),
                    np.arange(3, dtype=np.uint8), format_version=1, mean=0.5, std=0.25)
    with H5Dataset(path, "train") as ds:
        assert (ds.mean.tolist(), ds.std.tolist()) == ([0.5], [0.25])
        np.testing.assert_allclose(ds.read(np.arange(3))[0], 2.0)


def test_each_channel_is_normalised_with_its_own_statistics(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 3, 4, 4), dtype=np.uint8)
    mean, std = np.array([0.1, 0.5, 0.9]), np.array([0.2, 0.3, 0.4])
    path = write_h5(tmp_path / "rgb.h5", images, np.zeros(5, np.uint16), mean=mean, std=std,
                    num_classes=300, class_names=[f"c{k}" for k in range(300)])
    with H5Dataset(path, "train") as ds:
        x, _ = ds.read(np.arange(5))
        labels = ds.read_raw([4])[1]
        assert ds.class_names[299] == "c299" and labels.dtype == np.int64 and labels == [0]
    expected = (images / 255 - mean[:, None, None]) / std[:, None, None]
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-5)


def test_missing_and_non_hdf5_files_are_refused(tmp_path):
    with pytest.raises(DataError, match="nope.h5: no such file"):
        H5Dataset(tmp_path / "nope.h5", "train")
    (tmp_path / "text.h5").write_text("not hdf5\n")
    with pytest.raises(DataError, match="text.h5: not an HDF5 file"):
        H5Dataset(tmp_path / "text.h5", "train")
    with pytest.raises(DataError, match="test"):
        H5Dataset(write_h5(tmp_path / "t.h5", np.zeros((2,) + SHAPE, np.uint8),
                           np.zeros(2, np.uint8)), "test")


# --- DistributedSampler -------------------------------------------------------------------------
B = 60  # divisible by every world size 1..5


@pytest.mark.parametrize("n", [60, 61, 119, 120, 121, 250])
def test_training_shards_do_not_depend_on_world_size(n):
    reference = DistributedSampler(n, 1, 0, B, seed=3).batches()  # global batches, one process
    assert len(reference) == n // B
    whole = np.concatenate(reference)
    assert len(np.unique(whole)) == len(whole) and whole.min() >= 0 and whole.max() < n
    for world in range(1, 6):
        samplers = [DistributedSampler(n, world, r, B, seed=3) for r in range(world)]
        per_rank = [s.batches() for s in samplers]
        assert [len(s) for s in samplers] == [len(b) for b in per_rank] == [n // B] * world
        assert all(len(batch) == B // world for batches in per_rank for batch in batches)
        shards = [s.indices() for s in samplers]
        assert len(np.unique(np.concatenate(shards))) == sum(map(len, shards))  # disjoint
        assert set(np.concatenate(shards)) == set(whole)
        for k, global_batch in enumerate(reference):
            np.testing.assert_array_equal(np.concatenate([b[k] for b in per_rank]), global_batch)


def test_epochs_and_seeds_give_deterministic_permutations():
    sampler = DistributedSampler(1000, 2, 1, 100, seed=7)
    first = sampler.indices()
    sampler.set_epoch(1)
    second = sampler.indices()
    assert not np.array_equal(first, second)
    sampler.set_epoch(0)
    np.testing.assert_array_equal(sampler.indices(), first)
    np.testing.assert_array_equal(DistributedSampler(1000, 2, 1, 100, seed=7).indices(), first)
    assert not np.array_equal(DistributedSampler(1000, 2, 1, 100, seed=8).indices(), first)


@pytest.mark.parametrize("n", [1, 7, 100, 103])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_evaluation_counts_every_row_once(n, world):
    samplers = [DistributedSampler(n, world, r, 4 * world, shuffle=False, drop_last=False)
                for r in range(world)]
    per_rank = [s.batches() for s in samplers]
    np.testing.assert_array_equal(np.concatenate([s.indices() for s in samplers]), np.arange(n))
    assert [len(s) for s in samplers] == [len(b) for b in per_rank]
    assert all(0 < len(batch) <= 4 for batches in per_rank for batch in batches)
    assert all(len(batch) == 4 for batches in per_rank for batch in batches[:-1])


def test_sampler_refuses_bad_arguments():
    with pytest.raises(ValueError, match="batch_size 10 must be a positive multiple of "
                                         "world_size 4"):
        DistributedSampler(100, 4, 0, 10)
    with pytest.raises(ValueError, match="batch_size 128 exceeds the dataset's 100 rows"):
        DistributedSampler(100, 1, 0, 128)
    with pytest.raises(ValueError, match="rank 2 is not in 0..1"):
        DistributedSampler(100, 2, 2, 10)
    assert len(DistributedSampler(100, 1, 0, 128, shuffle=False, drop_last=False)) == 1


# --- Loader -------------------------------------------------------------------------------------
def collect(loader):
    return [(x.copy(), y.copy()) for x, y in loader]


@pytest.mark.parametrize("prefetch", [False, True])
def test_loader_serves_the_sampler_batches(tiny, prefetch):
    path, images, labels = tiny
    with H5Dataset(path, "train") as ds:
        sampler = DistributedSampler(N, 2, 1, 20, seed=1)
        loader = Loader(ds, sampler, prefetch=prefetch)
        assert len(loader) == N // 20
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            assert sampler.epoch == epoch
            batches = collect(loader)
            assert len(batches) == len(loader)
            for (x, y), rows in zip(batches, sampler.batches()):
                assert x.dtype == np.float32 and y.dtype == np.int64
                np.testing.assert_allclose(x, (images[rows] / 255 - 0.5) / 0.25, atol=1e-5)
                np.testing.assert_array_equal(y, labels[rows])


def test_prefetch_changes_nothing_and_reads_each_batch_in_file_order(tiny, monkeypatch):
    with H5Dataset(tiny[0], "train") as ds:
        reads = []
        read_raw = ds.read_raw
        monkeypatch.setattr(ds, "read_raw", lambda rows: reads.append(rows) or read_raw(rows))
        sampler = DistributedSampler(N, 3, 2, 15, seed=4)
        plain, prefetched = collect(Loader(ds, sampler)), collect(Loader(ds, sampler, False))
    assert len(plain) == len(prefetched) == N // 15
    for (x1, y1), (x2, y2) in zip(plain, prefetched):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    assert len(reads) == 2 * len(plain)  # one read a batch, never the shard at once
    for rows, batch in zip(reads, 2 * sampler.batches()):
        np.testing.assert_array_equal(rows, np.sort(batch))


@pytest.mark.parametrize("prefetch", [False, True])
def test_loader_errors_reach_the_consumer(tiny, monkeypatch, prefetch):
    with H5Dataset(tiny[0], "train") as ds:
        loader = Loader(ds, DistributedSampler(N, 1, 0, 10), prefetch=prefetch)
        calls = []

        def normalize(images):
            calls.append(1)
            if len(calls) == 3:
                raise OSError("disk gone")
            return images.astype(np.float32)

        monkeypatch.setattr(ds, "normalize", normalize)
        served = []
        with pytest.raises(OSError, match="disk gone"):
            for batch in loader:
                served.append(batch)
        assert len(served) == 2
        monkeypatch.setattr(ds, "read_raw", lambda rows: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            next(iter(loader))
    assert not _prefetch_threads()


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "ddl-prefetch"]


def test_abandoned_epoch_leaves_no_thread(tmp_path):
    n = 5000  # the thread fills its queue and waits long before the epoch is done
    path = write_h5(tmp_path / "big.h5", np.zeros((n,) + SHAPE, np.uint8), np.zeros(n, np.uint8))
    with H5Dataset(path, "train") as ds:
        loader = Loader(ds, DistributedSampler(n, 1, 0, 10))
        start = time.perf_counter()
        for _ in loader:
            break
        assert not _prefetch_threads()
        iterator = iter(loader)
        next(iterator)
        assert len(_prefetch_threads()) == 1
        iterator.close()
        assert not _prefetch_threads()
        assert time.perf_counter() - start < 2


def in_memory_epoch(ds, images, labels, sampler, shift=0, flip=False):
    """The reference: the loader as it was before it streamed, every image in memory and each
    epoch's draws made in one call for all rows."""
    rng = np.random.default_rng((sampler.seed, sampler.epoch, 1))
    shifts = rng.integers(-shift, shift + 1, (sampler.n, 2)) if shift else None
    flips = rng.random(sampler.n) < 0.5 if flip else None
    for batch in sampler.batches():
        x = images[batch]
        if shift:
            x = data.translate(x, shifts[batch], shift)
        if flip:
            x[flips[batch]] = x[flips[batch], :, :, ::-1]
        yield ds.normalize(x), labels[batch].astype(np.int64)


LAYOUTS = {  # how images may lie in a file (the file's and the dataset's options), and whether
    # rows are then read with pread
    "chunks of 8 rows": ({}, dict(chunks=(8,) + SHAPE), True),
    "contiguous": ({}, {}, True),
    "chunks after a user block": (dict(userblock_size=1024), dict(chunks=(8,) + SHAPE), True),
    "gzip chunks": ({}, dict(chunks=(8,) + SHAPE, compression="gzip"), False),
    "chunks of part rows": ({}, dict(chunks=(8, 1, 2, 5)), False),
}


@pytest.mark.parametrize("gap_bytes, draw_block, prefetch, layout", [
    (0, 5, False, "chunks of 8 rows"), (60, 7, True, "chunks of 8 rows"),
    (data.READ_GAP_BYTES, 1 << 16, False, "contiguous"), (60, 7, False, "gzip chunks"),
    (0, 5, False, "chunks of part rows"), (0, 5, True, "chunks after a user block")])
def test_streaming_serves_what_the_in_memory_loader_served(tmp_path, monkeypatch, gap_bytes,
                                                           draw_block, prefetch, layout):
    """Bit for bit, on every rank of 1, 2 and 3, from the start of an epoch and resumed within
    it, on a subset and on the whole file, shuffled with augmentation and in evaluation's order;
    in files whose rows HDF5 reads, or pread, with reads that cross chunk boundaries, and the
    draws made in blocks that do not divide the rows."""
    monkeypatch.setattr(data, "READ_GAP_BYTES", gap_bytes)
    monkeypatch.setattr(data, "DRAW_BLOCK", draw_block)
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (N,) + SHAPE, dtype=np.uint8)
    labels = rng.integers(0, 10, N).astype(np.uint8)
    file_options, storage, direct = LAYOUTS[layout]
    with h5py.File(tmp_path / "chunked.h5", "w", **file_options) as f:
        f.attrs.update({"format_version": 2, "mean": [0.5], "std": [0.25], "num_classes": 10})
        f.create_dataset("train/images", data=images, **storage)
        f.create_dataset("train/labels", data=labels)
    cases = [dict(shift=2, flip=True), dict(shift=1), dict(flip=True), {}]
    checked = 0
    with H5Dataset(tmp_path / "chunked.h5", "train") as ds:
        assert (ds._fd is not None) == direct
        for (n, world), options in zip([(N, 1), (77, 2), (N, 3), (90, 2)], cases):
            for rank in range(world):
                for shuffle in (True, False):
                    sampler = DistributedSampler(n, world, rank, 12, seed=9, shuffle=shuffle,
                                                 drop_last=shuffle)
                    loader = Loader(ds, sampler, prefetch=prefetch, **options)
                    for epoch, start in [(0, 0), (1, 0), (1, 3), (2, 5)]:
                        loader.set_epoch(epoch, start)
                        got = collect(loader)
                        expected = list(in_memory_epoch(ds, images, labels, sampler, **options))
                        assert len(got) == len(expected) == len(loader) - start > 0
                        for (x, y), (x_ref, y_ref) in zip(got, expected):
                            assert x.dtype == x_ref.dtype and y.dtype == y_ref.dtype
                            np.testing.assert_array_equal(x, x_ref)
                            np.testing.assert_array_equal(y, y_ref)
                            checked += 1
    assert checked > 200


def test_a_file_truncated_while_open_is_one_error(tmp_path):
    n = 50
    path = write_h5(tmp_path / "t.h5", np.ones((n,) + SHAPE, np.uint8), np.zeros(n, np.uint8))
    with H5Dataset(path, "train") as ds:
        assert ds.read_raw([n - 1])[0].all()
        with open(path, "r+b") as f:
            f.truncate(ds._offsets[0] + 10 * 20)    # rows 10.. gone
        assert ds.read_raw([9])[0].all()
        with pytest.raises(DataError, match="row 10 lies past the end of the file"):
            ds.read_raw([10])


def test_draws_in_blocks_are_the_draws_of_one_call(monkeypatch):
    monkeypatch.setattr(data, "DRAW_BLOCK", 333)
    for shift, n in [(1, 1000), (3, 999), (100, 4001)]:
        shifts, flips = data.draws(4, 2, n, shift, True)
        rng = np.random.default_rng((4, 2, 1))
        np.testing.assert_array_equal(shifts, rng.integers(-shift, shift + 1, (n, 2)))
        np.testing.assert_array_equal(flips, rng.random(n) < 0.5)
        assert shifts.itemsize == 1
    assert data.draws(4, 2, 10, 0, False) == (None, None)


# --- augmentation ---------------------------------------------------------------------------------
def test_translate_moves_each_image_and_fills_with_black():
    images = np.arange(2 * 2 * 4 * 5, dtype=np.uint8).reshape(2, 2, 4, 5) + 1
    moved = data.translate(images, np.array([[1, 0], [-2, 3]]), 3)
    np.testing.assert_array_equal(moved[0, :, 1:], images[0, :, :-1])     # one row down
    assert not moved[0, :, 0].any()
    np.testing.assert_array_equal(moved[1, :, :2, 3:], images[1, :, 2:, :2])   # up 2, right 3
    assert not moved[1, :, 2:].any() and not moved[1, :, :, :3].any()


def augmented(path, world, rank, **options):
    """Every batch of rank `rank` of `world` in epoch 1, as uint8 images, with the rows."""
    with H5Dataset(path, "train") as ds:
        sampler = DistributedSampler(N, world, rank, 20, seed=5)
        loader = Loader(ds, sampler, prefetch=False, **options)
        loader.set_epoch(1)
        batches = [(np.rint((x * 0.25 + 0.5) * 255).astype(np.uint8), rows)
                   for (x, _), rows in zip(loader, sampler.batches())]
    return batches


def test_augmentation_depends_on_the_row_not_the_rank(tiny):
    """Shifts and flips are drawn per row from (seed, epoch): N ranks see what one process sees,
    and a run resumed at this epoch sees it again. Each image is moved by up to 2 pixels, and
    some, not all, are mirrored."""
    path, images, _ = tiny
    single = augmented(path, 1, 0, shift=2, flip=True)
    again = augmented(path, 1, 0, shift=2, flip=True)
    split = [augmented(path, 4, r, shift=2, flip=True) for r in range(4)]
    for k, (x, _) in enumerate(single):
        np.testing.assert_array_equal(again[k][0], x)
        np.testing.assert_array_equal(np.concatenate([split[r][k][0] for r in range(4)]), x)
    x, rows = single[0]
    moves = [np.array([[dy, dx]]) for dy in range(-2, 3) for dx in range(-2, 3)]
    mirrored = []
    for a, b in zip(x, images[rows]):
        plain, mirror = ([np.array_equal(a, data.translate(c[None], m, 2)[0]) for m in moves]
                         for c in (b, b[..., ::-1]))
        assert any(plain) or any(mirror)
        mirrored.append(any(mirror))
    assert 0 < sum(mirrored) < len(rows)
    assert sum(not np.array_equal(a, b) for a, b in zip(x, images[rows])) > len(rows) // 2
    for x, rows in augmented(path, 1, 0):                    # no augmentation: as stored
        np.testing.assert_array_equal(x, images[rows])

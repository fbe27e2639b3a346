"""ddl.data: H5Dataset reads and validation, DistributedSampler sharding, Loader batches."""
import threading
import time

import h5py
import numpy as np
import pytest

from ddl import data
from ddl.data import DataError, DistributedSampler, H5Dataset, Loader, shifted

N, SHAPE = 103, (1, 4, 5)  # a row is 20 bytes


def write_h5(path, images, labels, split="train", **attrs):
    """A prepared-style file with one split; `attrs` override mean=0.5, std=0.25, num_classes=10."""
    with h5py.File(path, "w") as f:
        f.attrs.update({"mean": 0.5, "std": 0.25, "num_classes": 10, **attrs})
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
@pytest.mark.parametrize("block_bytes", [7 * 20, data.READ_BLOCK_BYTES])
def test_read_raw_returns_the_requested_rows(tiny, monkeypatch, block_bytes):
    monkeypatch.setattr(data, "READ_BLOCK_BYTES", block_bytes)  # 7-row blocks cross boundaries
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
        assert (ds.mean, ds.std) == (0.5, 0.25)
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
    "3-D images": (lambda p: _replace(p, "train/images", np.zeros((N, 4, 5), np.uint8)),
                   "'train/images' has shape (103, 4, 5), expected (N, C, H, W)"),
    "count mismatch": (lambda p: _replace(p, "train/labels", np.zeros(N - 1, np.uint8)),
                       "'train/labels' has shape (102,), expected (103,)"),
    "label out of range": (lambda p: _replace(p, "train/labels", np.arange(N, dtype=np.uint8)),
                           "'train/labels' row 10 is 10, outside 0..9"),
    "missing mean": (lambda p: _set_attr(p, "mean", None), "attribute 'mean' missing"),
    "zero std": (lambda p: _set_attr(p, "std", 0.0), "bad normalisation attributes"),
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


def test_prefetch_changes_nothing_and_reads_only_the_shard(tiny, monkeypatch):
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
    assert len(reads) == 2  # one shard read per epoch
    for rows in reads:
        np.testing.assert_array_equal(rows, np.sort(sampler.indices()))


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


# --- augmentation ---------------------------------------------------------------------------------
def test_shifted_moves_each_image_and_fills_with_zeros():
    rng = np.random.default_rng(3)
    images = rng.integers(1, 256, size=(5, 2, 6, 7)).astype(np.uint8)
    offsets = np.array([[0, 0], [2, -1], [-2, 2], [1, 0], [0, -2]])
    out = shifted(images, offsets, 2)
    for k, (dy, dx) in enumerate(offsets):
        for r in range(6):
            for q in range(7):
                inside = 0 <= r - dy < 6 and 0 <= q - dx < 7
                expected = images[k, :, r - dy, q - dx] if inside else 0
                np.testing.assert_array_equal(out[k, :, r, q], expected)


def test_shifts_are_the_same_for_any_world_size(tiny):
    """Each image's offset depends on (seed, epoch, row) only: two ranks together see exactly
    the images one process sees."""
    with H5Dataset(tiny[0], "train") as ds:
        def global_batches(world, epoch):
            loaders = [Loader(ds, DistributedSampler(N, world, r, 20, seed=4), prefetch=False,
                              shift=2) for r in range(world)]
            for loader in loaders:
                loader.set_epoch(epoch)
            return [np.concatenate(xs) for xs in zip(*([x for x, _ in l] for l in loaders))]
        one, two = global_batches(1, 0), global_batches(2, 0)
        for a, b in zip(one, two):
            np.testing.assert_array_equal(a, b)
        unshifted = [x for x, _ in Loader(ds, DistributedSampler(N, 1, 0, 20, seed=4),
                                          prefetch=False)]
        assert any(not np.array_equal(a, b) for a, b in zip(one, unshifted))

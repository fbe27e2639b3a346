"""ddl.prepare: the real MNIST conversion, and every refusal on synthetic IDX files."""
import errno
import functools
import gzip
import hashlib
import http.server
import os
import struct
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from ddl import prepare
from ddl.data import H5Dataset
from ddl.errors import OutputError
from ddl.prepare import DATASETS, PrepareError, prepare_dataset

# From SOURCE.md, independent of ddl.prepare's table.
SOURCE_MD5 = {"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
              "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
              "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
              "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"}
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def raw_idx(folder, name):
    """The uint8 payload of a real MNIST file, parsed here without ddl.prepare."""
    with gzip.open(Path(folder) / name) as f:
        data = f.read()
    if "images" in name:
        return np.frombuffer(data, np.uint8, offset=16).reshape(-1, 28, 28)
    return np.frombuffer(data, np.uint8, offset=8)


@pytest.fixture(scope="module")
def mnist(mnist_h5):
    """The real MNIST file converted once per session (conftest's mnist_h5), read back whole."""
    with h5py.File(mnist_h5, "r") as f:
        contents = {key: f[key][...] for key in
                    ("train/images", "train/labels", "test/images", "test/labels")}
        layout = {key: (f[key].dtype, f[key].shape, f[key].chunks, f[key].compression)
                  for key in contents}
        attrs = dict(f.attrs)
    return {"path": mnist_h5, "contents": contents, "layout": layout, "attrs": attrs}


def test_mnist_counts_and_label_histograms(mnist):
    c = mnist["contents"]
    assert len(c["train/images"]) == len(c["train/labels"]) == 60000
    assert len(c["test/images"]) == len(c["test/labels"]) == 10000
    assert np.bincount(c["train/labels"], minlength=10).tolist() == TRAIN_COUNTS
    assert np.bincount(c["test/labels"], minlength=10).tolist() == TEST_COUNTS


def test_mnist_contents_equal_idx_bytes(mnist, mnist_raw):
    c = mnist["contents"]
    train = raw_idx(mnist_raw, "train-images-idx3-ubyte.gz")
    test = raw_idx(mnist_raw, "t10k-images-idx3-ubyte.gz")
    for row in (0, 1, 12345, 59999):
        np.testing.assert_array_equal(c["train/images"][row, 0], train[row])
    for row in (0, 5000, 9999):
        np.testing.assert_array_equal(c["test/images"][row, 0], test[row])
    for split, prefix in (("train", "train"), ("test", "t10k")):
        labels = raw_idx(mnist_raw, f"{prefix}-labels-idx1-ubyte.gz")
        np.testing.assert_array_equal(c[f"{split}/labels"], labels)
    assert c["train/labels"][:5].tolist() == [5, 0, 4, 1, 9]  # the well-known first digits


def test_mnist_statistics(mnist):
    attrs = mnist["attrs"]
    assert abs(attrs["mean"] - 33.3184 / 255) < 0.0001 / 255  # SOURCE.md, 4 decimals
    assert abs(attrs["std"] - 0.3081) < 1e-4                   # the usual MNIST constant
    sums = np.zeros(3)  # count, sum, sum of squares, in blocks: the float64 copy is 376 MB
    for block in np.array_split(mnist["contents"]["train/images"], 6):
        pixels = block.astype(np.float64) / 255
        sums += pixels.size, pixels.sum(), (pixels * pixels).sum()
    mean = sums[1] / sums[0]
    assert attrs["mean"] == pytest.approx(mean, rel=1e-12)
    assert attrs["std"] == pytest.approx(np.sqrt(sums[2] / sums[0] - mean ** 2), rel=1e-9)
    assert attrs["mean"].dtype == attrs["std"].dtype == np.float64


def test_mnist_schema_and_attrs(mnist):
    layout = mnist["layout"]
    for split, n in (("train", 60000), ("test", 10000)):
        dtype, shape, chunks, compression = layout[f"{split}/images"]
        assert (dtype, shape, compression) == (np.uint8, (n, 1, 28, 28), None)
        assert chunks == (1024, 1, 28, 28)
        assert layout[f"{split}/labels"][:2] == (np.uint8, (n,))
    attrs = mnist["attrs"]
    assert attrs["dataset"] == "mnist"
    assert attrs["num_classes"] == 10 and attrs["format_version"] == 1
    assert {name: attrs[f"md5_{name}"] for name in SOURCE_MD5} == SOURCE_MD5
    assert os.listdir(mnist["path"].parent) == ["mnist.h5"]  # no temporary file left


# --- synthetic IDX files ------------------------------------------------------------------------
def write_idx(path, array, magic=None, dims=None):
    """Write uint8 `array` as a gzip IDX file; `magic`/`dims` override the header to corrupt it."""
    array = np.asarray(array, np.uint8)
    magic = 0x0800 | array.ndim if magic is None else magic
    dims = array.shape if dims is None else dims
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(f">I{len(dims)}I", magic, *dims) + array.tobytes())


def make_raw(folder, n_train=30, n_test=10, seed=0):
    """Four valid synthetic IDX files in `folder`; returns their arrays by file name."""
    rng = np.random.default_rng(seed)
    arrays = {"train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28)),
              "train-labels-idx1-ubyte.gz": np.arange(n_train) % 10,
              "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28)),
              "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, n_test)}
    folder.mkdir(exist_ok=True)
    for name, array in arrays.items():
        write_idx(folder / name, array)
    return arrays


def quiet_prepare(raw, out, **kwargs):
    return prepare_dataset(raw, out, **{"verify": False, "log": lambda msg: None, **kwargs})


def test_synthetic_round_trip_opens_with_h5dataset(tmp_path):
    arrays = make_raw(tmp_path / "raw")
    out = tmp_path / "out" / "digits.h5"  # the folder does not exist yet
    summary = quiet_prepare(tmp_path / "raw", out, dataset="my-digits")
    train = arrays["train-images-idx3-ubyte.gz"]
    assert summary["dataset"] == "my-digits" and (summary["train"], summary["test"]) == (30, 10)
    assert summary["path"] == str(out) and summary["seconds"] > 0
    assert summary["mean"] == pytest.approx(train.mean() / 255)
    assert summary["std"] == pytest.approx((train / 255).std())
    with H5Dataset(out, "test") as ds:
        images, labels = ds.read_raw(np.arange(10))
        np.testing.assert_array_equal(images[:, 0], arrays["t10k-images-idx3-ubyte.gz"])
        np.testing.assert_array_equal(labels, arrays["t10k-labels-idx1-ubyte.gz"])
        assert ds.mean == summary["mean"] and ds.num_classes == 10


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


BREAKAGES = {  # name: (how to break a valid raw folder, file named in the error, words in it)
    "truncated gzip": (lambda raw: truncate(raw / "train-images-idx3-ubyte.gz"),
                       "train-images-idx3-ubyte.gz", "truncated or corrupt gzip"),
    "not gzip": (lambda raw: (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip"),
                 "t10k-labels-idx1-ubyte.gz", "truncated or corrupt gzip"),
    "wrong magic": (lambda raw: write_idx(raw / "train-labels-idx1-ubyte.gz", np.zeros(30),
                                          magic=0x00000803),
                    "train-labels-idx1-ubyte.gz", "wrong magic 0x00000803, expected 0x00000801"),
    "size vs header": (lambda raw: write_idx(raw / "t10k-images-idx3-ubyte.gz",
                                             np.zeros((10, 28, 28)), dims=(11, 28, 28)),
                       "t10k-images-idx3-ubyte.gz", "header says 11x28x28 = 8624 bytes"),
    "count mismatch": (lambda raw: write_idx(raw / "train-labels-idx1-ubyte.gz", np.zeros(29)),
                       "train-images-idx3-ubyte.gz", "30 images but train-labels"),
    "label out of range": (lambda raw: write_idx(raw / "t10k-labels-idx1-ubyte.gz",
                                                 [1, 2, 3, 4, 5, 10, 0, 0, 0, 0]),
                           "t10k-labels-idx1-ubyte.gz", "label 10 at row 5 is out of range"),
    "wrong image dims": (lambda raw: write_idx(raw / "train-images-idx3-ubyte.gz",
                                               np.zeros((30, 27, 28))),
                         "train-images-idx3-ubyte.gz", "images are 27x28, expected 28x28"),
    "missing file": (lambda raw: os.remove(raw / "t10k-images-idx3-ubyte.gz"),
                     "t10k-images-idx3-ubyte.gz", "--download"),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_broken_input_is_refused(tmp_path, breakage):
    make_raw(tmp_path / "raw")
    breaker, name, words = BREAKAGES[breakage]
    breaker(tmp_path / "raw")
    with pytest.raises(PrepareError) as err:
        quiet_prepare(tmp_path / "raw", tmp_path / "out.h5")
    message = str(err.value)
    assert name in message and words in message and "\n" not in message
    assert not (tmp_path / "out.h5").exists()


def test_md5_mismatch_is_refused(tmp_path):
    make_raw(tmp_path / "raw")
    with pytest.raises(PrepareError) as err:
        prepare_dataset(tmp_path / "raw", tmp_path / "out.h5", log=lambda msg: None)
    actual = hashlib.md5((tmp_path / "raw" / "train-images-idx3-ubyte.gz").read_bytes()).hexdigest()
    message = str(err.value)
    assert "train-images-idx3-ubyte.gz: MD5 mismatch" in message
    assert f"expected {SOURCE_MD5['train-images-idx3-ubyte.gz']}, got {actual}" in message


def test_unknown_dataset_needs_verify_false(tmp_path):
    make_raw(tmp_path / "raw")
    with pytest.raises(PrepareError, match="unknown dataset 'kmnist'.*verify=False"):
        prepare_dataset(tmp_path / "raw", tmp_path / "out.h5", dataset="kmnist")


def test_download_with_unreachable_mirrors_says_so_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(DATASETS["mnist"], "mirrors", ["http://127.0.0.1:9/"])
    start = time.perf_counter()
    with pytest.raises(PrepareError) as err:
        prepare_dataset(tmp_path / "raw", tmp_path / "out.h5", download=True,
                        log=lambda msg: None)
    message = str(err.value)
    assert message.startswith("cannot download train-images-idx3-ubyte.gz: network or mirrors "
                              "unreachable (http://127.0.0.1:9/train-images-idx3-ubyte.gz: ")
    assert "\n" not in message
    assert time.perf_counter() - start < 5
    assert os.listdir(tmp_path / "raw") == []  # no partial download left behind


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_download_falls_back_to_a_working_mirror(tmp_path, monkeypatch):
    make_raw(tmp_path / "served")
    md5 = {name: hashlib.md5(path.read_bytes()).hexdigest()
           for name, path in ((p.name, p) for p in (tmp_path / "served").iterdir())}
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=tmp_path / "served"))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        mirrors = ["http://127.0.0.1:9/", f"http://127.0.0.1:{server.server_port}/"]
        monkeypatch.setitem(DATASETS, "tiny", {"md5": md5, "mirrors": mirrors})
        messages = []
        summary = prepare_dataset(tmp_path / "raw", tmp_path / "out.h5", dataset="tiny",
                                  download=True, log=messages.append)
    finally:
        server.shutdown()
        thread.join()
    assert sorted(os.listdir(tmp_path / "raw")) == sorted(md5)
    assert summary["md5"] == md5 and summary["train"] == 30
    assert f"downloading {mirrors[1]}t10k-labels-idx1-ubyte.gz" in messages


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    make_raw(tmp_path / "raw")
    write_split = prepare._write_split

    def fail_on_test_split(f, split, images, labels):
        write_split(f, split, images, labels)
        if split == "test":
            raise KeyboardInterrupt  # after part of the file has been written

    monkeypatch.setattr(prepare, "_write_split", fail_on_test_split)
    (tmp_path / "out").mkdir()
    with pytest.raises(KeyboardInterrupt):
        quiet_prepare(tmp_path / "raw", tmp_path / "out" / "data.h5")
    assert os.listdir(tmp_path / "out") == []


def test_failed_run_keeps_the_existing_good_file(tmp_path, monkeypatch):
    make_raw(tmp_path / "raw")
    out = tmp_path / "out" / "data.h5"
    quiet_prepare(tmp_path / "raw", out)
    good = out.read_bytes()

    def fail(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)        # where a full disk may first show
    with pytest.raises(OutputError, match=r"cannot write .*data\.h5 \(No space left on device\); "
                                          r"the previous file is kept"):
        quiet_prepare(tmp_path / "raw", out)
    assert out.read_bytes() == good
    assert os.listdir(out.parent) == ["data.h5"]


"""ddl prepare: the real MNIST conversion, synthetic IDX files, .npz archives and image folders,
every refusal of a bad input (one line naming the file, nothing written), and the streaming."""
import errno
import functools
import gzip
import hashlib
import http.server
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import COLOURS, colour_images, prepared, quiet
from ddl import prepare, sources
from ddl.data import H5Dataset
from ddl.errors import OutputError, PrepareError
from ddl.sources import DATASETS

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
    assert attrs["mean"].shape == attrs["std"].shape == (1,)    # one channel
    assert abs(attrs["mean"][0] - 33.3184 / 255) < 0.0001 / 255  # SOURCE.md, 4 decimals
    assert abs(attrs["std"][0] - 0.3081) < 1e-4                   # the usual MNIST constant
    sums = np.zeros(3)  # count, sum, sum of squares, in blocks: the float64 copy is 376 MB
    for block in np.array_split(mnist["contents"]["train/images"], 6):
        pixels = block.astype(np.float64) / 255
        sums += pixels.size, pixels.sum(), (pixels * pixels).sum()
    mean = sums[1] / sums[0]
    assert attrs["mean"][0] == pytest.approx(mean, rel=1e-12)
    assert attrs["std"][0] == pytest.approx(np.sqrt(sums[2] / sums[0] - mean ** 2), rel=1e-9)
    assert attrs["mean"].dtype == attrs["std"].dtype == np.float64


def test_mnist_schema_and_attrs(mnist):
    layout = mnist["layout"]
    for split, n in (("train", 60000), ("test", 10000)):
        dtype, shape, chunks, compression = layout[f"{split}/images"]
        assert (dtype, shape, compression) == (np.uint8, (n, 1, 28, 28), None)
        assert chunks == (prepare.CHUNK_BYTES // 784, 1, 28, 28)   # about 1 MiB of images
        assert layout[f"{split}/labels"][:2] == (np.uint8, (n,))
    attrs = mnist["attrs"]
    assert attrs["dataset"] == "mnist" and attrs["source"] == "idx"
    assert attrs["num_classes"] == 10 and attrs["format_version"] == 2
    assert list(attrs["class_names"]) == [str(d) for d in range(10)]
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
    """`ddl prepare --raw RAW --no-verify` (unless verify=True); returns its summary."""
    source = sources.idx(raw, **{"verify": False, "log": quiet, **kwargs})
    return prepare.prepare(source, out, log=quiet)


def test_synthetic_round_trip_opens_with_h5dataset(tmp_path):
    arrays = make_raw(tmp_path / "raw")
    out = tmp_path / "out" / "digits.h5"  # the folder does not exist yet
    summary = quiet_prepare(tmp_path / "raw", out, dataset="my-digits")
    train = arrays["train-images-idx3-ubyte.gz"]
    assert summary["dataset"] == "my-digits" and (summary["train"], summary["test"]) == (30, 10)
    assert summary["path"] == str(out) and summary["seconds"] > 0
    assert summary["shape"] == (1, 28, 28) and summary["classes"] == 10
    assert summary["mean"] == pytest.approx([train.mean() / 255])
    assert summary["std"] == pytest.approx([(train / 255).std()])
    with H5Dataset(out, "test") as ds:
        images, labels = ds.read_raw(np.arange(10))
        np.testing.assert_array_equal(images[:, 0], arrays["t10k-images-idx3-ubyte.gz"])
        np.testing.assert_array_equal(labels, arrays["t10k-labels-idx1-ubyte.gz"])
        assert ds.mean.tolist() == summary["mean"] and ds.num_classes == 10


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
                                             np.zeros((9, 28, 28)), dims=(10, 28, 28)),
                       "t10k-images-idx3-ubyte.gz",
                       "header says 10x28x28 = 7840 bytes of data, file holds 7056"),
    "count mismatch": (lambda raw: write_idx(raw / "train-labels-idx1-ubyte.gz", np.zeros(29)),
                       "train-images-idx3-ubyte.gz", "30 images but train-labels"),
    "label out of range": (lambda raw: write_idx(raw / "t10k-labels-idx1-ubyte.gz",
                                                 [1, 2, 3, 4, 5, 10, 0, 0, 0, 0]),
                           "t10k-labels-idx1-ubyte.gz", "label 10 at row 5 is out of range"),
    "wrong image dims": (lambda raw: write_idx(raw / "train-images-idx3-ubyte.gz",
                                               np.zeros((30, 27, 28))),
                         "t10k-images-idx3-ubyte.gz",
                         "images are 28x28, but the training images are 27x28"),
    "longer than header": (lambda raw: write_idx(raw / "t10k-images-idx3-ubyte.gz",
                                                 np.zeros((11, 28, 28)), dims=(10, 28, 28)),
                           "t10k-images-idx3-ubyte.gz", "= 7840 bytes of data, file holds 8624"),
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
        quiet_prepare(tmp_path / "raw", tmp_path / "out.h5", verify=True)
    actual = hashlib.md5((tmp_path / "raw" / "train-images-idx3-ubyte.gz").read_bytes()).hexdigest()
    message = str(err.value)
    assert "train-images-idx3-ubyte.gz: MD5 mismatch" in message
    assert f"expected {SOURCE_MD5['train-images-idx3-ubyte.gz']}, got {actual}" in message


def test_unknown_dataset_needs_verify_false(tmp_path):
    make_raw(tmp_path / "raw")
    with pytest.raises(PrepareError, match="unknown dataset 'kmnist'.*verify=False"):
        sources.idx(tmp_path / "raw", dataset="kmnist")


def test_download_with_unreachable_mirrors_says_so_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(DATASETS["mnist"], "mirrors", ["http://127.0.0.1:9/"])
    start = time.perf_counter()
    with pytest.raises(PrepareError) as err:
        sources.idx(tmp_path / "raw", download=True, log=quiet)
    message = str(err.value)
    assert message.startswith("cannot download train-images-idx3-ubyte.gz: network or mirrors "
                              "unreachable (http://127.0.0.1:9/train-images-idx3-ubyte.gz: ")
    assert "\n" not in message
    assert time.perf_counter() - start < 5
    assert os.listdir(tmp_path / "raw") == []  # no partial download left behind


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A dataset "tiny" whose IDX files a local HTTP server serves, behind a dead mirror: the
    files' MD5s, and the two mirrors."""
    make_raw(tmp_path / "served")
    md5 = {name: hashlib.md5(path.read_bytes()).hexdigest()
           for name, path in ((p.name, p) for p in (tmp_path / "served").iterdir())}
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=tmp_path / "served"))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    mirrors = ["http://127.0.0.1:9/", f"http://127.0.0.1:{server.server_port}/"]
    monkeypatch.setitem(DATASETS, "tiny", {"md5": md5, "mirrors": mirrors})
    yield md5, mirrors
    server.shutdown()
    thread.join()


def test_download_falls_back_to_a_working_mirror(tmp_path, mirror):
    md5, mirrors = mirror
    messages = []
    source = sources.idx(tmp_path / "raw", dataset="tiny", download=True, log=messages.append)
    assert sorted(os.listdir(tmp_path / "raw")) == sorted(md5)
    assert {name: source.attrs[f"md5_{name}"] for name in md5} == md5
    assert len(source.splits["train"].labels) == 30
    assert f"downloading {mirrors[1]}t10k-labels-idx1-ubyte.gz" in messages


def test_a_download_that_cannot_be_saved_says_so(tmp_path, mirror):
    """Not "network or mirrors unreachable": the file is named, and nothing is left beside it."""
    (tmp_path / "raw" / "train-labels-idx1-ubyte.gz").mkdir(parents=True)   # in the way
    with pytest.raises(OutputError, match=r"cannot write .*raw/train-labels-idx1-ubyte\.gz \(Is a "
                       r"directory\)"):
        sources.idx(tmp_path / "raw", dataset="tiny", download=True, log=quiet)
    assert sorted(os.listdir(tmp_path / "raw")) == ["train-images-idx3-ubyte.gz",
                                                   "train-labels-idx1-ubyte.gz"]


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    make_raw(tmp_path / "raw")
    write_split = prepare._write_split

    def fail_on_test_split(group, *args):
        counts = write_split(group, *args)
        if group.name == "/test":
            raise KeyboardInterrupt  # after part of the file has been written
        return counts

    monkeypatch.setattr(prepare, "_write_split", fail_on_test_split)
    (tmp_path / "out").mkdir()
    with pytest.raises(KeyboardInterrupt):
        quiet_prepare(tmp_path / "raw", tmp_path / "out" / "data.h5")
    assert os.listdir(tmp_path / "out") == []


def test_a_killed_conversions_leftover_goes(tmp_path):
    """SIGKILL skips every cleanup: the next conversion removes the temporary file."""
    make_raw(tmp_path / "raw")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / f"data.h5.{dead.pid}.5eed.tmp").write_bytes(b"half a data set")
    quiet_prepare(tmp_path / "raw", tmp_path / "out" / "data.h5")
    assert os.listdir(tmp_path / "out") == ["data.h5"]


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



# --- .npz archives -------------------------------------------------------------------------------
def write_npz(path, x_train, y_train, x_test, y_test, compressed=False):
    (np.savez_compressed if compressed else np.savez)(
        path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


@pytest.mark.parametrize("layout", ["channels-last", "channels-first", "grayscale"])
@pytest.mark.parametrize("compressed", [False, True])
def test_npz_round_trip(tmp_path, layout, compressed):
    """Any layout Keras-style sets come in gives (N, C, H, W) images, channel statistics of
    every training pixel, and the labels, also from a (N, 1) column."""
    (x_train, y_train), (x_test, y_test) = colour_images(40, 0), colour_images(9, 1)
    nchw = {"channels-last": lambda x: x.transpose(0, 3, 1, 2),
            "channels-first": lambda x: x.transpose(0, 3, 1, 2),
            "grayscale": lambda x: x[..., :1].transpose(0, 3, 1, 2)}[layout]
    given = {"channels-last": lambda x: x, "channels-first": nchw,
             "grayscale": lambda x: x[..., 0]}[layout]
    npz = write_npz(tmp_path / "set.npz", given(x_train), y_train[:, None], given(x_test), y_test,
                    compressed)
    out = prepared(sources.npz(npz, log=quiet), tmp_path / "set.h5")
    with H5Dataset(out, "train") as train, H5Dataset(out, "test") as test:
        np.testing.assert_array_equal(train.read_raw(np.arange(40))[0], nchw(x_train))
        np.testing.assert_array_equal(test.read_raw(np.arange(9))[0], nchw(x_test))
        np.testing.assert_array_equal(train.labels, y_train)
        np.testing.assert_array_equal(test.labels, y_test)
        pixels = nchw(x_train).transpose(1, 0, 2, 3).reshape(train.image_shape[0], -1) / 255
        np.testing.assert_allclose(train.mean, pixels.mean(1), rtol=1e-12)
        np.testing.assert_allclose(train.std, pixels.std(1), rtol=1e-9)
        assert train.class_names == ["0", "1", "2", "3"] and train.num_classes == 4
    with h5py.File(out) as f:
        assert (f.attrs["dataset"], f.attrs["source"]) == ("set", "npz")


def test_npz_takes_other_integer_pixels_and_fortran_order(tmp_path):
    (x, y), (xt, yt) = colour_images(12, 0), colour_images(5, 1)
    npz = write_npz(tmp_path / "w.npz", np.asfortranarray(x.astype(np.int16)), y, xt, yt)
    out = prepared(sources.npz(npz, log=quiet), tmp_path / "w.h5")
    with H5Dataset(out, "train") as train:
        np.testing.assert_array_equal(train.read_raw(np.arange(12))[0], x.transpose(0, 3, 1, 2))


def bad_npz(**change):
    """A valid .npz's arrays with `change` applied (a key set to None is left out)."""
    (x, y), (xt, yt) = colour_images(12, 0), colour_images(5, 1)
    arrays = {"x_train": x, "y_train": y, "x_test": xt, "y_test": yt, **change}
    return {k: v for k, v in arrays.items() if v is not None}


NPZ_BREAKAGES = {  # name: (arrays, words in the one-line error)
    "no x_test": (bad_npz(x_test=None), "no x_test (an .npz holds x_train, y_train"),
    "float pixels": (bad_npz(x_train=np.zeros((12, 32, 32, 3), np.float32)),
                     "x_train holds float32 pixels; ddl stores 0..255 as uint8"),
    "pixel out of range": (bad_npz(x_train=np.full((12, 8, 8), 300, np.int32),
                                   x_test=np.zeros((5, 8, 8), np.uint8)),
                           "x_train row 0 holds pixel value 300, outside 0..255"),
    "5-D images": (bad_npz(x_test=np.zeros((5, 2, 3, 4, 5), np.uint8)), "x_test: images of "
                   "shape (2, 3, 4, 5)"),
    "mismatched shapes": (bad_npz(x_test=np.zeros((5, 3, 16, 16), np.uint8)),
                          "x_test holds 3x16x16 images, x_train 3x32x32"),
    "label count": (bad_npz(y_train=np.zeros(11, np.uint8)), "y_train has 11 labels for 12"),
    "float labels": (bad_npz(y_test=np.zeros(5, np.float64)), "y_test is float64 (5,), "
                     "expected integer labels"),
    "negative label": (bad_npz(y_test=np.array([0, 1, -1, 2, 3])),
                       "test label -1 at row 2 is out of range"),
    "no images": (bad_npz(x_train=np.zeros((0, 8, 8), np.uint8), y_train=np.zeros(0, np.int64)),
                  "x_train holds no images"),
}


@pytest.mark.parametrize("breakage", NPZ_BREAKAGES)
def test_bad_npz_is_refused(tmp_path, breakage):
    arrays, words = NPZ_BREAKAGES[breakage]
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(PrepareError) as err:
        prepared(sources.npz(tmp_path / "bad.npz", log=quiet), tmp_path / "out.h5")
    assert str(err.value).startswith(f"{tmp_path / 'bad.npz'}: ") and words in str(err.value)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out.h5").exists()


@pytest.mark.parametrize("order", ["C", "F"])
def test_a_damaged_npz_is_one_line(tmp_path, order):
    """A flipped byte in the images of an uncompressed archive fails its CRC as it is read."""
    (x, y), (xt, yt) = colour_images(12, 0), colour_images(5, 1)
    npz = write_npz(tmp_path / "d.npz", np.asarray(x, order=order), y, xt, yt)
    raw = bytearray(npz.read_bytes())
    raw[raw.index(b"x_train.npy") + 400] ^= 0xFF          # inside x_train's pixels
    npz.write_bytes(bytes(raw))
    with pytest.raises(PrepareError, match=r"d\.npz: x_train: damaged archive \(Bad CRC-32"):
        prepared(sources.npz(npz, log=quiet), tmp_path / "out.h5")
    assert not (tmp_path / "out.h5").exists()


def test_not_an_npz_is_refused(tmp_path):
    (tmp_path / "x.npz").write_text("hello")
    with pytest.raises(PrepareError, match=r"x\.npz: not an \.npz archive"):
        sources.npz(tmp_path / "x.npz", log=quiet)


# --- image folders -------------------------------------------------------------------------------
def test_image_folder_equals_the_npz(colour_h5, colour_folder_h5):
    """The same images as PNG files in class folders give the same file as the .npz, but for
    the class names, which are the folders' (sorted)."""
    with h5py.File(colour_h5) as a, h5py.File(colour_folder_h5) as b:
        for key in ("train/images", "train/labels", "test/images", "test/labels"):
            np.testing.assert_array_equal(a[key][...], b[key][...])
        for key in ("num_classes", "mean", "std", "format_version"):
            np.testing.assert_array_equal(a.attrs[key], b.attrs[key])
        assert list(b.attrs["class_names"]) == COLOURS and b.attrs["source"] == "image-folder"
        assert b.attrs["dataset"] == "colours" and a.attrs["mean"].shape == (3,)


def image(path, size=(6, 5), mode="RGB", value=0):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)


def small_folder(root, size=(6, 5)):
    """ROOT/{train,test}/{a,b}/: PNG images of `size` (width, height), RGB and grayscale."""
    for split in ("train", "test"):
        image(root / split / "b" / "1.png", size, value=(200, 10, 10))
        image(root / split / "a" / "2.png", size, mode="L", value=40)
    image(root / "train" / "a" / "sub" / "3.png", size, value=(1, 2, 3))
    return root


def test_image_folder_classes_modes_and_hidden_files(tmp_path):
    root = small_folder(tmp_path / "set")
    (root / "train" / "b" / ".DS_Store").write_bytes(b"\0junk")    # hidden: skipped
    out = prepared(sources.image_folder(root, log=quiet), tmp_path / "set.h5")
    with H5Dataset(out, "train") as train:
        assert train.class_names == ["a", "b"] and train.image_shape == (3, 5, 6)
        images, labels = train.read_raw(np.arange(3))
        assert labels.tolist() == [0, 0, 1]                       # a/2.png, a/sub/3.png, b/1.png
        assert images[0].max() == images[0].min() == 40           # grayscale as RGB
        assert images[2, :, 0, 0].tolist() == [200, 10, 10]
    for path in root.rglob("*.png"):                               # all grayscale: one channel
        image(path, mode="L", value=7)
    out = prepared(sources.image_folder(root, log=quiet), tmp_path / "gray.h5")
    with H5Dataset(out, "test") as test:
        assert test.image_shape == (1, 5, 6) and test.read_raw(np.arange(2))[0].max() == 7
        assert test.std.tolist() == [1.0]           # all alike: normalised to 0, not divided by 0
        np.testing.assert_allclose(test.read(np.arange(2))[0], 0, atol=1e-6)


FOLDER_BREAKAGES = {  # name: (how to break a small folder, the file named, words in the error)
    "mixed sizes": (lambda r: image(r / "test" / "b" / "1.png", size=(5, 6)), "test/b/1.png",
                    "6x5 pixels, but"),
    "empty class": (lambda r: (r / "train" / "c").mkdir(), "train/c", "an empty class"),
    "not an image": (lambda r: (r / "train" / "b" / "notes.txt").write_text("hi"),
                     "train/b/notes.txt", "not an image"),
    "unknown test class": (lambda r: image(r / "test" / "z" / "1.png"), "test/z",
                           "no such class in"),
    "loose file": (lambda r: image(r / "train" / "1.png"), "train/1.png",
                   "not in a class folder"),
    "no test folder": (lambda r: shutil.rmtree(r / "test"), "test", "no such folder"),
    "truncated image": (lambda r: truncate(r / "train" / "b" / "1.png"), "train/b/1.png",
                        "cannot decode"),
}


@pytest.mark.parametrize("breakage", FOLDER_BREAKAGES)
def test_bad_image_folder_is_refused(tmp_path, breakage):
    root = small_folder(tmp_path / "set", size=(64, 64))    # big enough to truncate mid-data
    breaker, name, words = FOLDER_BREAKAGES[breakage]
    breaker(root)
    with pytest.raises(PrepareError) as err:
        prepared(sources.image_folder(root, log=quiet), tmp_path / "out.h5")
    message = str(err.value)
    assert message.startswith(str(root / name)) and words in message and "\n" not in message
    assert not (tmp_path / "out.h5").exists()


# --- streaming ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["npz", "npz-compressed", "image-folder", "idx"])
def test_a_set_streams_through_in_chunks(tmp_path, monkeypatch, kind):
    """Converting 2.4 MB of images allocates at most a few chunks' worth: no source or stage
    holds the whole set (Python's and NumPy's allocations, traced)."""
    import tracemalloc
    monkeypatch.setattr(prepare, "CHUNK_BYTES", 1 << 14)
    rng = np.random.default_rng(0)
    if kind == "idx":
        x = rng.integers(0, 256, (3000, 1, 28, 28), dtype=np.uint8)
        y = np.arange(len(x)) % 10
        make_raw(tmp_path / "raw")
        write_idx(tmp_path / "raw" / "train-images-idx3-ubyte.gz", x[:, 0])
        write_idx(tmp_path / "raw" / "train-labels-idx1-ubyte.gz", y)
        source = sources.idx(tmp_path / "raw", verify=False)
    else:
        x = rng.integers(0, 256, (800, 3, 32, 32), dtype=np.uint8)
        y = np.arange(len(x)) % 10
        if kind == "image-folder":
            from PIL import Image
            for split, n in (("train", 800), ("test", 100)):
                for i in range(n):
                    folder = tmp_path / "set" / split / str(y[i])
                    folder.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(x[i].transpose(1, 2, 0)).save(folder / f"{i:03d}.png")
            source = sources.image_folder(tmp_path / "set", log=quiet)
            x = x[np.argsort(y, kind="stable")]            # the folders' order: by class
        else:
            path = write_npz(tmp_path / "big.npz", x, y, x[:100], y[:100],
                             kind == "npz-compressed")
            source = sources.npz(path, log=quiet)
    tracemalloc.start()      # not counted: the labels and headers that the source read
    try:
        prepared(source, tmp_path / "out.h5")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < x.nbytes / 4, (peak, x.nbytes)
    with H5Dataset(tmp_path / "out.h5", "train") as train:
        np.testing.assert_array_equal(train.read_raw(np.arange(train.n))[0], x)

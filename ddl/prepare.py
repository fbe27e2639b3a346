"""Convert the four IDX gzip files of MNIST (or Fashion-MNIST) into one HDF5 file.

Output schema (format_version 1):
    /train/images  uint8 (N, 1, 28, 28)    /train/labels  uint8 (N,)
    /test/images   uint8 (M, 1, 28, 28)    /test/labels   uint8 (M,)
    attrs: dataset, num_classes, mean and std (training pixels scaled to [0, 1]), md5_<source file>,
           format_version

The file is written under a temporary name and renamed into place, so a run that fails or is killed
never leaves a half-written file that a later training run would take for a good one.
"""
import gzip
import hashlib
import http.client
import io
import os
import time
import urllib.request
import zlib

import h5py
import numpy as np

from ddl.atomic import write_bytes
from ddl.errors import PrepareError

FORMAT_VERSION = 1
NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28)
# Rows per HDF5 chunk (~800 KB of MNIST images): a contiguous block of rows is a few chunk reads.
# Uncompressed: the loader reads every epoch, and gzip chunks made a full read of the training
# images 8x slower (0.20 s vs 0.024 s) to save space on a file that is only ~55 MB plain.
CHUNK_ROWS = 1024
DOWNLOAD_TIMEOUT = 10.0

SPLITS = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

DATASETS = {
    "mnist": {
        "md5": {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        "mirrors": ["https://ossci-datasets.s3.amazonaws.com/mnist/",
                    "https://storage.googleapis.com/cvdf-datasets/mnist/"],
    },
    "fashion-mnist": {
        "md5": {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        "mirrors": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
    },
}


def prepare_dataset(raw_dir, out_path, dataset="mnist", verify=True, download=False, log=print):
    """Convert `raw_dir`'s four IDX gzip files into the HDF5 file `out_path`; return a summary.

    verify=True checks every file against the MD5 table of `dataset` (which must be in DATASETS);
    verify=False accepts any dataset in the MNIST IDX layout and records `dataset` as given.
    download=True fetches missing files from the dataset's mirrors.
    Returns {"path", "dataset", "train", "test" (row counts), "mean", "std", "md5", "seconds"}.
    """
    start = time.perf_counter()
    spec = DATASETS.get(dataset)
    if verify and spec is None:
        raise PrepareError(f"unknown dataset {dataset!r} (known: {', '.join(DATASETS)}); "
                           f"pass verify=False to convert other IDX files unchecked")
    md5s = {}
    for name in (name for pair in SPLITS.values() for name in pair):
        path = os.path.join(raw_dir, name)
        expected = spec["md5"][name] if verify else None
        if not os.path.isfile(path):
            if not download:
                raise PrepareError(f"{path}: missing (put the file there or use --download)")
            if spec is None:
                raise PrepareError(f"{path}: missing, and no download mirrors are known for "
                                   f"dataset {dataset!r}")
            _download(name, raw_dir, spec["mirrors"], expected, log)
        md5s[name] = _md5(path)
        if expected and md5s[name] != expected:
            raise PrepareError(f"{path}: MD5 mismatch, expected {expected}, got {md5s[name]}")

    splits = {split: _load_split(raw_dir, *names) for split, names in SPLITS.items()}
    mean, std = _pixel_stats(splits["train"][0])
    attrs = {"dataset": dataset, "num_classes": NUM_CLASSES, "mean": mean, "std": std,
             "format_version": FORMAT_VERSION, **{f"md5_{k}": v for k, v in md5s.items()}}
    _write_h5(out_path, splits, attrs)
    summary = {"path": os.fspath(out_path), "dataset": dataset,
               "train": len(splits["train"][1]), "test": len(splits["test"][1]),
               "mean": mean, "std": std, "md5": md5s,
               "seconds": time.perf_counter() - start}
    log(f"wrote {summary['path']}: {summary['train']} train + {summary['test']} test images, "
        f"mean {mean:.4f} std {std:.4f}, {summary['seconds']:.2f} s")
    return summary


def read_idx(path, kind):
    """Parse one gzip IDX file into a uint8 array: kind "images" -> (N, H, W), "labels" -> (N,)."""
    ndim = 3 if kind == "images" else 1
    magic = 0x0800 | ndim  # 0x08 = unsigned byte data, low byte = number of dimensions
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise PrepareError(f"{path}: truncated or corrupt gzip ({e})") from None
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise PrepareError(f"{path}: IDX header truncated ({len(raw)} bytes)")
    got = int.from_bytes(raw[:4], "big")
    if got != magic:
        raise PrepareError(f"{path}: wrong magic 0x{got:08x}, expected 0x{magic:08x} for {kind}")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    data = np.frombuffer(raw, np.uint8, offset=header)
    if data.size != np.prod(dims):
        raise PrepareError(f"{path}: header says {'x'.join(map(str, dims))} = {np.prod(dims)} "
                           f"bytes of data, file holds {data.size}")
    return data.reshape(dims)


def _load_split(raw_dir, images_name, labels_name):
    """Read and cross-check one split: images uint8 (N, 28, 28), labels uint8 (N,)."""
    images_path = os.path.join(raw_dir, images_name)
    labels_path = os.path.join(raw_dir, labels_name)
    images, labels = read_idx(images_path, "images"), read_idx(labels_path, "labels")
    if images.shape[1:] != IMAGE_SHAPE:
        raise PrepareError(f"{images_path}: images are {images.shape[1]}x{images.shape[2]}, "
                           f"expected {IMAGE_SHAPE[0]}x{IMAGE_SHAPE[1]}")
    if len(images) == 0:
        raise PrepareError(f"{images_path}: holds no images")
    if len(images) != len(labels):
        raise PrepareError(f"{images_path}: {len(images)} images but {labels_name} has "
                           f"{len(labels)} labels")
    bad = np.flatnonzero(labels >= NUM_CLASSES)
    if bad.size:
        raise PrepareError(f"{labels_path}: label {labels[bad[0]]} at row {bad[0]} is out of "
                           f"range (expected < {NUM_CLASSES})")
    return images, labels


def _pixel_stats(images):
    """Mean and std of uint8 `images` (N, H, W) scaled to [0, 1], exact, in float64.

    A 256-bin histogram, built block by block, because np.std on 47 M pixels would allocate a
    float64 copy of the whole training set (~380 MB).
    """
    hist = np.zeros(256, np.int64)
    for lo in range(0, len(images), CHUNK_ROWS):
        hist += np.bincount(images[lo:lo + CHUNK_ROWS].ravel(), minlength=256)
    values = np.arange(256) / 255.0
    mean = float(hist @ values / hist.sum())
    std = float(np.sqrt(hist @ (values - mean) ** 2 / hist.sum()))
    return mean, std


def _write_h5(out_path, splits, attrs):
    """Write {split: (images (N, H, W), labels (N,))} and `attrs` to `out_path`, atomically (a
    failed write is an OutputError and keeps any previous file)."""
    folder = os.path.dirname(os.path.abspath(out_path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise PrepareError(f"{out_path}: cannot create folder {folder} ({e.strerror})") from None
    # Built in memory (~55 MB for MNIST) and written as plain bytes: HDF5 writing straight to a
    # disk that fills gave a many-line error and then crashed the interpreter on closing.
    image = io.BytesIO()
    with h5py.File(image, "w") as f:
        f.attrs.update(attrs)
        for split, (images, labels) in splits.items():
            _write_split(f, split, images, labels)
    write_bytes(out_path, image.getbuffer())


def _write_split(f, split, images, labels):
    """Group `split` with images uint8 (N, 1, H, W) and labels uint8 (N,), chunked along rows."""
    group = f.create_group(split)
    rows = min(CHUNK_ROWS, len(images))
    group.create_dataset("images", data=images[:, None], chunks=(rows, 1) + images.shape[1:])
    group.create_dataset("labels", data=labels, chunks=(rows,))


def _md5(path):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(name, raw_dir, mirrors, expected_md5, log):
    """Fetch `name` from the first mirror that serves it (with the expected MD5, if given)."""
    os.makedirs(raw_dir, exist_ok=True)
    path = os.path.join(raw_dir, name)
    tmp = f"{path}.{os.getpid()}.part"  # never leave a partial download under the real name
    failures = []
    try:
        for mirror in mirrors:
            url = mirror.rstrip("/") + "/" + name
            log(f"downloading {url}")
            try:
                with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response:
                    with open(tmp, "wb") as f:
                        while block := response.read(1 << 20):
                            f.write(block)
            except (OSError, http.client.HTTPException, ValueError) as e:
                failures.append(f"{url}: {e}")
                continue
            if expected_md5 and _md5(tmp) != expected_md5:
                failures.append(f"{url}: MD5 mismatch")
                continue
            os.replace(tmp, path)
            return
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    raise PrepareError(f"cannot download {name}: network or mirrors unreachable "
                       f"({'; '.join(failures)})")

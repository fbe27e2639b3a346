"""What `ddl prepare` converts: the IDX gzip files of MNIST and its kin, an .npz archive, an
ImageFolder tree. Each reader checks what it can up front and returns a Source whose images are
read in chunks while they are written (ddl/prepare.py), so no set has to fit in memory.

Every problem with the input is a PrepareError, one line naming the file: found up front where the
headers, the labels or the file names show it, else while the chunks are read.
"""
import dataclasses
import functools
import gzip
import hashlib
import http.client
import os
import urllib.request
import zipfile
import zlib
from typing import Callable

import numpy as np

from ddl.atomic import write_bytes
from ddl.data import MAX_CLASSES
from ddl.errors import OutputError, PrepareError, dims, one_line
from ddl.images import convert

SPLITS = ("train", "test")


@dataclasses.dataclass
class Split:
    """One split: `labels` int64 (n,) in [0, num_classes), the image `shape` (C, H, W), and
    `chunks(rows)`, an iterator of uint8 images (k, C, H, W), k <= rows, n in all, in the labels'
    order, read as it goes."""
    labels: np.ndarray
    shape: tuple
    chunks: Callable


@dataclasses.dataclass
class Source:
    """The splits by name ("train", "test"), the class names (index = label), what the file
    records of where it came from (`dataset` and `source`, at least), and the inputs that the
    output may not replace nor lie inside: (option, path) pairs, files or (an image folder)
    folders."""
    splits: dict
    class_names: list
    attrs: dict
    inputs: list = dataclasses.field(default_factory=list)


def printable(name):
    """A file name as text that any file and terminal take: bytes that are not UTF-8 (which
    os.listdir gives as surrogates) kept as backslash escapes, e.g. "caf\\xe9"."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _class_names(labels, path):
    """"0".."K-1" for labels {split: (n,)} without names, K = the largest label + 1; a negative
    label, or one past the most classes a data file holds (which would make K names), is
    refused."""
    for split, y in labels.items():
        for row in (int(np.argmin(y)), int(np.argmax(y))):
            if not 0 <= y[row] < MAX_CLASSES:
                raise PrepareError(f"{path}: {split} label {y[row]} at row {row} is out of range "
                                   f"(labels are 0..K-1, K <= {MAX_CLASSES})")
    return [str(i) for i in range(int(max(y.max() for y in labels.values())) + 1)]


def named(source, names, where):
    """`source` with class names `names` (label k -> names[k]); refused unless there is one
    distinct, non-empty name for every label the splits hold (more names: classes without
    images)."""
    names = [str(name) for name in names]
    top = max(int(split.labels.max()) for split in source.splits.values())
    if len(names) <= top:
        raise PrepareError(f"{where}: {len(names)} class names, but the labels go up to {top} "
                           f"(label k is named by the k-th name)")
    if len(set(names)) != len(names) or not all(names):
        raise PrepareError(f"{where}: the class names must be distinct and non-empty, got "
                           f"{', '.join(names)}")
    source.class_names = names
    return source


def _images_of(shape, where):
    """(C, H, W) of images that are 2-D (one channel) or 3-D with a channels axis first or last:
    the channels are the shorter of the two ends (the last on a tie, as Keras keeps them), and
    which one it was (True: last)."""
    if len(shape) == 2:
        return (1, *shape), False
    if len(shape) != 3:
        raise PrepareError(f"{where}: images of shape {shape}, expected (H, W), (H, W, C) or "
                           f"(C, H, W)")
    last = shape[2] <= shape[0]
    return ((shape[2], shape[0], shape[1]) if last else tuple(shape)), last


# --- IDX: MNIST, Fashion-MNIST and other sets in their layout ------------------------------------
IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
DOWNLOAD_TIMEOUT = 10.0
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
        "classes": [str(d) for d in range(10)],
    },
    "fashion-mnist": {
        "md5": {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        "mirrors": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
        "classes": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                    "Sneaker", "Bag", "Ankle boot"],
    },
}


def idx(raw_dir, dataset="mnist", verify=True, download=False, log=print):
    """The four IDX gzip files in `raw_dir` (MNIST's names). verify=True checks each against the
    MD5 table of `dataset` (a key of DATASETS); verify=False takes any set in that layout and
    records `dataset` as given, its class names those of DATASETS or "0".."K-1". download=True
    fetches missing files from the dataset's mirrors."""
    spec = DATASETS.get(dataset)
    if verify and spec is None:
        raise PrepareError(f"unknown dataset {dataset!r} (known: {', '.join(DATASETS)}); "
                           f"pass verify=False (--no-verify) to convert other IDX files unchecked")
    md5s = {}
    for name in (name for pair in IDX_FILES.values() for name in pair):
        path = os.path.join(raw_dir, name)
        expected = spec["md5"][name] if verify else None
        if not os.path.isfile(path):
            if not download:
                raise PrepareError(f"{path}: missing (put the file there or use --download)")
            if spec is None:
                raise PrepareError(f"{path}: missing, and no download mirrors are known for "
                                   f"dataset {dataset!r}")
            md5s[name] = _download(name, raw_dir, spec["mirrors"], expected, log)
        else:
            md5s[name] = _md5(path)
        if expected and md5s[name] != expected:
            raise PrepareError(f"{path}: MD5 mismatch, expected {expected}, got {md5s[name]}")

    splits, labels = {}, {}
    for split, (images_name, labels_name) in IDX_FILES.items():
        images_path = os.path.join(raw_dir, images_name)
        labels_path = os.path.join(raw_dir, labels_name)
        labels[split] = read_idx(labels_path, "labels").astype(np.int64)
        with _IdxFile(images_path, "images") as f:
            size = f.dims
        if size[0] == 0:
            raise PrepareError(f"{images_path}: holds no images")
        if size[0] != len(labels[split]):
            raise PrepareError(f"{images_path}: {size[0]} images but {labels_name} has "
                               f"{len(labels[split])} labels")
        if split == "test" and size[1:] != splits["train"].shape[1:]:
            raise PrepareError(f"{images_path}: images are {dims(size[1:])}, but the training "
                               f"images are {dims(splits['train'].shape[1:])}")
        splits[split] = Split(labels[split], (1, *size[1:]),
                              functools.partial(_idx_chunks, images_path, size))
    names = (spec or {}).get("classes") or _class_names(labels, raw_dir)
    for split, (_, labels_name) in IDX_FILES.items():
        bad = np.flatnonzero(labels[split] >= len(names))
        if bad.size:
            raise PrepareError(f"{os.path.join(raw_dir, labels_name)}: label "
                               f"{labels[split][bad[0]]} at row {bad[0]} is out of range "
                               f"(expected < {len(names)})")
    return Source(splits, names, {"dataset": dataset, "source": "idx",
                                  **{f"md5_{k}": v for k, v in md5s.items()}},
                  idx_inputs(raw_dir))


def idx_inputs(raw_dir):
    """The IDX files that `idx(raw_dir)` reads, as Source.inputs."""
    return [("--raw", os.path.join(raw_dir, name)) for pair in IDX_FILES.values()
            for name in pair]


class _IdxFile:
    """A gzip IDX file, opened past its header (use it in a `with`): `dims` is (N, H, W) for kind
    "images", (N,) for "labels"."""

    def __init__(self, path, kind):
        self.path, ndim = path, 3 if kind == "images" else 1
        magic = 0x0800 | ndim  # 0x08 = unsigned byte data, low byte = number of dimensions
        try:
            self.f = gzip.open(path, "rb")
        except OSError as e:                  # there a moment ago, when it was checked
            raise PrepareError(f"{path}: cannot read ({e.strerror or e})") from None
        try:
            header = self.read(4 + 4 * ndim)
            if len(header) < 4 + 4 * ndim:
                raise PrepareError(f"{path}: IDX header truncated ({len(header)} bytes)")
            got = int.from_bytes(header[:4], "big")
            if got != magic:
                raise PrepareError(f"{path}: wrong magic 0x{got:08x}, expected 0x{magic:08x} "
                                   f"for {kind}")
        except BaseException:
            self.f.close()
            raise
        self.dims = tuple(int(d) for d in np.frombuffer(header, ">u4", ndim, 4))

    def read(self, size=-1):
        try:
            return self.f.read(size)
        except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
            raise PrepareError(f"{self.path}: truncated or corrupt gzip ({e})") from None

    def size_error(self, held):
        """The error for a file whose data, `held` bytes, is not the size its header says."""
        return PrepareError(f"{self.path}: header says {dims(self.dims)} = "
                            f"{np.prod(self.dims)} bytes of data, file holds {held}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def read_idx(path, kind):
    """One whole gzip IDX file as a uint8 array: kind "images" -> (N, H, W), "labels" -> (N,)."""
    with _IdxFile(path, kind) as f:
        data = np.frombuffer(f.read(), np.uint8)
        if data.size != np.prod(f.dims):
            raise f.size_error(data.size)
    return data.reshape(f.dims)


def _idx_chunks(path, dims, rows):
    """The images of IDX file `path` (dims (N, H, W)) as uint8 (k, 1, H, W) chunks."""
    n, h, w = dims
    with _IdxFile(path, "images") as f:
        for lo in range(0, n, rows):
            k = min(rows, n - lo)
            data = f.read(k * h * w)
            if len(data) < k * h * w:
                raise f.size_error(lo * h * w + len(data))
            yield np.frombuffer(data, np.uint8).reshape(k, 1, h, w)
        extra = sum(len(block) for block in iter(lambda: f.read(1 << 16), b""))
        if extra:
            raise f.size_error(n * h * w + extra)


def _md5(path):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(name, raw_dir, mirrors, expected_md5, log):
    """Fetch `name` into `raw_dir` from the first mirror that serves it (with the expected MD5, if
    given); returns its MD5. The file appears whole or not at all, and a failure to write it is
    an OutputError naming it, not a network failure."""
    path = os.path.join(raw_dir, name)
    try:
        os.makedirs(raw_dir, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create folder {raw_dir} ({e.strerror})") from None
    failures = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + name
        log(f"downloading {url}")
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response:
                data = response.read()     # an IDX file: tens of MB at most
        except (OSError, http.client.HTTPException, ValueError) as e:
            failures.append(f"{url}: {e}")
            continue
        md5 = hashlib.md5(data).hexdigest()
        if expected_md5 and md5 != expected_md5:
            failures.append(f"{url}: MD5 mismatch")
            continue
        write_bytes(path, data)
        return md5
    raise PrepareError(f"cannot download {name}: network or mirrors unreachable "
                       f"({'; '.join(failures)})")


# --- .npz: x_train, y_train, x_test, y_test, as Keras's datasets ---------------------------------
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def npz(path, log=print):
    """An .npz archive of x_train, y_train, x_test, y_test (np.savez or savez_compressed): images
    (N, H, W), (N, H, W, C) or (N, C, H, W) of integers in 0..255, labels (N,) or (N, 1) of
    integers 0..K-1, and optionally `class_names`, K strings (label k -> class_names[k]; without
    it, "0".."K-1"). Images are streamed from the archive, except those saved in Fortran order,
    which are read whole."""
    if not os.path.isfile(path):
        raise PrepareError(f"{path}: no such file")
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise PrepareError(f"{path}: not an .npz archive ({e})") from None
    with archive:
        members = {name.removesuffix(".npy"): name for name in archive.namelist()}
        missing = [key for key in NPZ_KEYS if key not in members]
        if missing:
            raise PrepareError(f"{path}: no {', '.join(missing)} (an .npz holds x_train, y_train, "
                               f"x_test, y_test, as Keras's datasets)")
        headers = {split: _npy_header(archive, members[f"x_{split}"], path) for split in SPLITS}
        labels = {split: _npz_labels(archive, members[f"y_{split}"], path, headers[split][0][0])
                  for split in SPLITS}
        given = _npz_names(archive, members["class_names"], path) if "class_names" in members \
            else None
    splits = {}
    for split in SPLITS:
        (shape, _, dtype), key = headers[split], f"x_{split}"
        if dtype.kind not in "ui":
            raise PrepareError(f"{path}: {key} holds {dtype} pixels; ddl stores 0..255 as uint8: "
                               f"save {key} as uint8")
        if shape[0] == 0:
            raise PrepareError(f"{path}: {key} holds no images")
        chw, last = _images_of(shape[1:], f"{path}: {key}")
        if split == "test" and chw != splits["train"].shape:
            raise PrepareError(f"{path}: x_test holds {dims(chw)} images, x_train "
                               f"{dims(splits['train'].shape)}")
        log(f"{key} {shape}: {dims(chw)} images (channels "
            f"{'last' if last else 'first'})")
        splits[split] = Split(labels[split], chw,
                              functools.partial(_npz_chunks, path, members[key], key, last))
    source = Source(splits, _class_names(labels, path),
                    {"dataset": printable(os.path.splitext(os.path.basename(path))[0]),
                     "source": "npz"}, [("--npz", path)])
    return source if given is None else named(source, given, f"{path}: class_names")


def _npz_names(archive, member, path):
    """The class names of `member`, a 1-D array of strings."""
    try:
        with archive.open(member) as f:
            names = np.lib.format.read_array(f, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise PrepareError(f"{path}: class_names is not a readable array of strings "
                           f"({one_line(e)})") from None
    if names.ndim != 1 or names.dtype.kind not in "US":
        raise PrepareError(f"{path}: class_names is {names.dtype} {names.shape}, expected strings "
                           f"(K,)")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _npy_header(archive, member, path):
    """(shape, fortran_order, dtype) of the .npy `member`, read from its header alone."""
    with archive.open(member) as f:
        return _read_npy_header(f, f"{path}: {member}")


def _read_npy_header(f, where):
    try:
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read is None:
            raise ValueError(f".npy format {version[0]}.{version[1]}")
        shape, fortran, dtype = read(f)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise PrepareError(f"{where}: not a readable .npy array ({e})") from None
    if dtype.hasobject:
        raise PrepareError(f"{where}: holds Python objects, not numbers")
    return shape, fortran, dtype


def _npz_labels(archive, member, path, n):
    """The labels of `member` as int64 (n,), checked."""
    key = member.removesuffix(".npy")
    try:
        with archive.open(member) as f:
            y = np.lib.format.read_array(f, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise PrepareError(f"{path}: {key} is not a readable .npy array ({e})") from None
    if y.ndim == 2 and y.shape[1] == 1:        # Keras's CIFAR labels are (N, 1)
        y = y[:, 0]
    if y.ndim != 1 or y.dtype.kind not in "ui":
        raise PrepareError(f"{path}: {key} is {y.dtype} {y.shape}, expected integer labels (N,)")
    if len(y) != n:
        raise PrepareError(f"{path}: {key} has {len(y)} labels for {n} images")
    return y.astype(np.int64)


def _npz_chunks(path, member, key, last, rows):
    """The images of `member` as uint8 (k, C, H, W) chunks, straight from the archive; `last`:
    its images are channels-last."""
    try:
        archive = zipfile.ZipFile(path)       # again: this runs when the writer gets to it
    except (OSError, zipfile.BadZipFile) as e:
        raise PrepareError(f"{path}: cannot read ({e})") from None
    with archive, archive.open(member) as f:
        shape, fortran, dtype = _read_npy_header(f, f"{path}: {member}")
        if fortran:                # the first axis varies fastest: no row is in one piece
            whole = next(_npy_rows(f, (1, *shape), dtype, 1, f"{path}: {key}"))
            whole = whole.reshape(-1).reshape(shape, order="F")
            blocks = (whole[lo:lo + rows] for lo in range(0, len(whole), rows))
        else:
            blocks = _npy_rows(f, shape, dtype, rows, f"{path}: {key}")
        lo = 0
        for block in blocks:
            if block.dtype != np.uint8:
                bad = (block < 0) | (block > 255)
                if bad.any():
                    at = np.unravel_index(np.argmax(bad), block.shape)
                    raise PrepareError(f"{path}: {key} row {lo + at[0]} holds pixel value "
                                       f"{block[at]}, outside 0..255")
            if len(shape) == 3:
                block = block[:, None]
            elif last:
                block = block.transpose(0, 3, 1, 2)
            yield np.ascontiguousarray(block, np.uint8)
            lo += len(block)


def _npy_rows(f, shape, dtype, rows, where):
    """Blocks of at most `rows` rows of a C-order .npy array whose data follows in stream `f`."""
    row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
    for lo in range(0, shape[0], rows):
        k = min(rows, shape[0] - lo)
        try:
            data = f.read(k * row_bytes)
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise PrepareError(f"{where}: damaged archive ({e})") from None
        if len(data) < k * row_bytes:
            raise PrepareError(f"{where}: truncated, {lo * row_bytes + len(data):,} of "
                               f"{shape[0] * row_bytes:,} bytes of data")
        yield np.frombuffer(data, dtype).reshape(k, *shape[1:])


# --- ImageFolder: DIR/train/<class>/*.png, DIR/test/<class>/*.png --------------------------------
# Pillow's modes without colour: their images take one channel, every other mode three (RGB).
# Modes of more than 8 bits a channel (16-bit, 32-bit integers, floats) are refused: Pillow's
# conversion to 8 bits clips them, and no one rule (shift, scale by the maximum, by the file's
# range) is right for every such set.
GRAY_MODES = {"1", "L", "LA", "La"}
WIDE_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N", "F", "I;32", "F;32"}


def image_folder(root, log=print, resize=None, test_split=None, seed=0, shuffle=False):
    """Images in the ImageFolder layout, ROOT/train/<class>/... and ROOT/test/<class>/...: the
    class names are the training folder's subfolders, sorted (index = label), and the test set's
    must be among them. With `test_split` (a fraction in (0, 1)), ROOT/<class>/... instead, split
    by `_split_files`. Any format Pillow reads; files and folders whose names start with "." are
    skipped, any other file must be an image. All images must have one size, unless `resize`
    (H, W) gives it (ddl/images.py says how); grayscale ones give one channel, and if any image
    has colour, every image is read as RGB (alpha dropped). The rows go class by class, in sorted
    file order, or with `shuffle` in a random order seeded by `seed` (so that a prefix of the file
    is a fair sample)."""
    from PIL import Image
    if test_split:
        files, labels, names = _split_files(root, test_split, seed)
    else:
        files, labels, names = _split_folders(root)
    if shuffle:
        rng = np.random.default_rng((seed, 13))
        for split in SPLITS:
            order = rng.permutation(len(files[split]))
            files[split] = [files[split][i] for i in order]
            labels[split] = [labels[split][i] for i in order]
    size, first, gray = None, None, True
    for path in files["train"] + files["test"]:
        try:
            with Image.open(path) as im:       # the header only
                this, mode = im.size, im.mode
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise PrepareError(f"{path}: not an image ({one_line(e)})") from None
        if mode in WIDE_MODES or mode.startswith(("I;", "F;")):
            raise PrepareError(f"{path}: pixels of more than 8 bits (Pillow mode {mode}), which "
                               f"ddl does not scale down by guesswork: convert the images to "
                               f"8 bits per channel first")
        if 0 in this:
            raise PrepareError(f"{path}: an image of no pixels ({this[1]}x{this[0]})")
        if size is None:
            size, first = this, path
        elif this != size and not resize:
            raise PrepareError(f"{path}: {this[1]}x{this[0]} pixels, but {first} has "
                               f"{size[1]}x{size[0]} (every image must have one size; "
                               f"--resize HxW makes them one)")
        gray &= mode in GRAY_MODES
    shape = (1 if gray else 3, *(resize or (size[1], size[0])))
    log(f"{root}: {len(names)} classes, {dims(shape)} images"
        + (f" (resized bilinearly to {resize[0]}x{resize[1]})" if resize else "")
        + (f", {len(files['test'])} of {len(files['train']) + len(files['test'])} held out for "
           f"testing" if test_split else ""))
    splits = {split: Split(np.array(labels[split], np.int64), shape,
                           functools.partial(_decode, files[split], shape)) for split in SPLITS}
    return Source(splits, [printable(name) for name in names],
                  {"dataset": printable(os.path.basename(os.path.normpath(root))),
                   "source": "image-folder"}, [("--image-folder", root)])


def _split_folders(root):
    """({split: files}, {split: labels}, class names) of ROOT/train/<class>/ and
    ROOT/test/<class>/."""
    folders = {split: os.path.join(root, split) for split in SPLITS}
    for folder in (root, *folders.values()):
        if not os.path.isdir(folder):
            raise PrepareError(f"{folder}: no such folder (an image folder holds train/<class>/ "
                               f"and test/<class>/ folders of images, or <class>/ folders to "
                               f"split with --test-split)")
    files, labels = {}, {}
    names = None
    for split, folder in folders.items():
        classes = _class_folders(folder)
        if names is None:
            names = classes
        unknown = sorted(set(classes) - set(names))
        if unknown:
            raise PrepareError(f"{os.path.join(folder, unknown[0])}: no such class in "
                               f"{folders['train']}")
        files[split], labels[split] = [], []
        for name in classes:
            found = _image_files(os.path.join(folder, name))
            files[split] += found
            labels[split] += [names.index(name)] * len(found)
    return files, labels, names


def _split_files(root, fraction, seed):
    """({split: files}, {split: labels}, class names) of ROOT/<class>/, each class's files split
    at random (seeded by `seed`) into round(fraction * n) test images and the rest for training,
    each class keeping at least one of each; within a split, in sorted order."""
    if not os.path.isdir(root):
        raise PrepareError(f"{root}: no such folder")
    names = _class_folders(root)
    if {"train", "test"} <= set(names):
        raise PrepareError(f"{root} holds train/ and test/ already: --test-split is for a "
                           f"folder of <class>/ folders")
    rng = np.random.default_rng((seed, 11))
    files, labels = {split: [] for split in SPLITS}, {split: [] for split in SPLITS}
    for label, name in enumerate(names):
        found = _image_files(os.path.join(root, name))
        if len(found) < 2:
            raise PrepareError(f"{os.path.join(root, name)}: {len(found)} image, but a class "
                               f"split for testing needs at least 2")
        held = min(max(1, round(fraction * len(found))), len(found) - 1)
        test = set(rng.permutation(len(found))[:held].tolist())
        for i, path in enumerate(found):
            split = "test" if i in test else "train"
            files[split].append(path)
            labels[split].append(label)
    return files, labels, names


def _class_folders(folder):
    """The class names of a split's folder: its subfolders; a file beside them is refused."""
    names = _visible(os.listdir(folder))
    for name in names:
        if not os.path.isdir(os.path.join(folder, name)):
            raise PrepareError(f"{os.path.join(folder, name)}: not in a class folder (images go "
                               f"in {folder}/<class>/)")
    if not names:
        raise PrepareError(f"{folder}: no class folders")
    return names


def _image_files(folder):
    """Every visible file under `folder`, subfolders included, in sorted order; none, or one that
    is not a plain file (a FIFO, which would block the reader for ever, a device, a socket, a
    broken link): refused."""
    found = []
    for parent, dirs, names in os.walk(folder):
        dirs[:] = _visible(dirs)
        found += [os.path.join(parent, name) for name in _visible(names)]
    for path in found:
        if not os.path.isfile(path):
            raise PrepareError(f"{printable(path)}: not a plain file (a FIFO, device, socket or "
                               f"broken link): only images go in a class folder")
    if not found:
        raise PrepareError(f"{folder}: an empty class (no images)")
    return found


def _visible(names):
    """The names that do not start with ".", sorted."""
    return sorted(name for name in names if not name.startswith("."))


def _decode(paths, shape, rows):
    """The images of `paths` as uint8 (k, C, H, W) chunks of `shape` (converted and resized as
    ddl/images.py says), decoded one at a time."""
    from PIL import Image
    for lo in range(0, len(paths), rows):
        block = np.empty((min(rows, len(paths) - lo), *shape), np.uint8)
        for i, path in enumerate(paths[lo:lo + rows]):
            try:
                with Image.open(path) as im:
                    block[i] = convert(im, shape)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                raise PrepareError(f"{path}: cannot decode ({one_line(e)})") from None
        yield block

"""Hostile inputs (docs/trust.md): outputs that name inputs or links, a checkpoint that names code,
data files whose attributes lie, special files, stops mid-evaluation, non-finite buffers, a
damaged kernel cache. Each is refused in one line with its status and every existing file kept
byte-identical (conftest's `refused` and `untouched`), or handled as docs/trust.md says."""
import os
import pickle
import shutil
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest

from conftest import colour_images, refused, untouched
from ddl import checkpoint
from ddl.atomic import create_new
from ddl.config import Config
from ddl.errors import KernelCacheError
from ddl.train import run

FAST = ["--subset", "256", "--batch-size", "64"]
NET = ("from ddl import nn\nimport pathlib\n\npathlib.Path(__file__).with_name('ran').touch()\n\n\n"
       "def make(in_shape, num_classes):\n"
       "    return nn.Sequential(nn.Flatten(), nn.Linear({inputs}, num_classes))\n")


COMMON = dict(data="data.h5", subset=256, batch_size=64, epochs=1, quiet=True)


@pytest.fixture(scope="module")
def trained(small_h5, tmp_path_factory):
    """data.h5 (the small set) and c.h5, a checkpoint of 1 epoch of mlp on it."""
    folder = tmp_path_factory.mktemp("trusted")
    shutil.copy(small_h5, folder / "data.h5")
    run(Config(**dict(COMMON, data=str(folder / "data.h5")), model="mlp",
               checkpoint=str(folder / "c.h5")))
    return folder


@pytest.fixture
def work(trained, tmp_path, monkeypatch):
    """The current folder: data.h5, c.h5, victim.txt, and n.h5, a checkpoint of the model file
    net.py, which touches `ran` beside itself whenever it is imported (removed here)."""
    for name in ("data.h5", "c.h5"):
        shutil.copy(trained / name, tmp_path / name)
    (tmp_path / "victim.txt").write_text("not yours\n")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.py").write_text(NET.format(inputs=784))
    run(Config(**COMMON, model="net.py:make", checkpoint="n.h5"))
    (tmp_path / "ran").unlink()
    return tmp_path


def train(*args):
    return ["train", "--data", "data.h5", *FAST, "--epochs", "1", "--quiet", *args]


# --- 1. `ddl prepare` guards its output -------------------------------------------------------
@pytest.fixture
def npz(tmp_path):
    (x, y), (xt, yt) = colour_images(64, 0), colour_images(32, 1)
    np.savez(tmp_path / "c.npz", x_train=x, y_train=y, x_test=xt, y_test=yt)
    return tmp_path / "c.npz"


def test_prepare_never_replaces_an_input_or_a_file_of_another_kind(ddl, work, npz,
                                                                   colour_folder):
    image = next((colour_folder / "train" / "cat").iterdir())
    (work / "sub").mkdir()
    with untouched(work), untouched(colour_folder), untouched(npz.parent):
        refused(ddl("prepare", "--npz", npz, "--out", "c.h5"), 2,
                "--out c.h5 exists and is a ddl checkpoint", "never replaced")
        refused(ddl("prepare", "--npz", npz, "--out", "victim.txt"), 2, "not an HDF5 file")
        refused(ddl("prepare", "--npz", npz, "--out", "net.py"), 2, "not an HDF5 file")
        refused(ddl("prepare", "--image-folder", colour_folder, "--out", image), 2,
                "is inside --image-folder")
        refused(ddl("prepare", "--image-folder", colour_folder, "--out",
                    colour_folder / "train" / "cat" / "new.h5"), 2, "is inside --image-folder")
        (work / "in.npz").symlink_to(npz)
        refused(ddl("prepare", "--npz", "in.npz", "--out", npz), 2,
                f"--out {npz} is the same file as --npz in.npz")
        (work / "in.npz").unlink()
        code, output = ddl("prepare", "--npz", npz, "--out", "sub")
        refused((code, output), 2, "--out sub is a folder")
        assert "x_train" not in output            # refused before the source was read


def test_prepare_never_replaces_a_raw_idx_file(ddl, tmp_path):
    from test_prepare import make_raw
    make_raw(tmp_path / "raw")
    target = tmp_path / "raw" / "t10k-labels-idx1-ubyte.gz"
    with untouched(tmp_path):
        refused(ddl("prepare", "--raw", tmp_path / "raw", "--no-verify", "--out", target), 2,
                "is the same file as --raw")


def test_a_second_conversion_is_locked_out(ddl, npz, tmp_path):
    with checkpoint.Lock(tmp_path / "d.h5", "--out"), untouched(tmp_path):
        refused(ddl("prepare", "--npz", npz, "--out", tmp_path / "d.h5"), 2,
                "being written by another job", "choose another --out")


def test_an_npz_named_in_no_encoding_is_kept_escaped(ddl, npz, tmp_path):
    os.rename(npz, os.fsencode(tmp_path) + b"/r\xe9sum\xe9.npz")
    assert ddl("prepare", "--npz", os.fsdecode(os.fsencode(tmp_path) + b"/r\xe9sum\xe9.npz"),
               "--out", tmp_path / "d.h5")[0] == 0
    with h5py.File(tmp_path / "d.h5") as f:
        assert f.attrs["dataset"] == "r\\xe9sum\\xe9"


def test_prepare_replaces_its_own_file(ddl, npz, tmp_path):
    assert ddl("prepare", "--npz", npz, "--out", tmp_path / "d.h5")[0] == 0
    assert ddl("prepare", "--npz", npz, "--out", tmp_path / "d.h5")[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz", "d.h5"]


# --- 2. the model file is an input --------------------------------------------------------------
@pytest.mark.parametrize("option", ["--checkpoint", "--metrics", "--timeline"])
def test_no_output_replaces_the_model_file(option, ddl, work):
    with untouched(work):
        refused(ddl(*train("--model", "net.py:make", option, "net.py", "--overwrite")), 2,
                f"{option} net.py is the same file as --model")


# --- 3. no write through a link, no guessable temporary name, every output claimed -------------
def test_a_link_planted_at_the_lock_is_refused(ddl, work):
    (work / "c.h5.lock").symlink_to(work / "victim.txt")
    with untouched(work):
        refused(ddl(*train("--checkpoint", "c.h5", "--resume", "--epochs", "2")), 2,
                "lock file c.h5.lock", "symbolic link")
    (work / "c.h5.lock").unlink()
    os.link(work / "victim.txt", work / "c.h5.lock")
    with untouched(work):
        refused(ddl(*train("--checkpoint", "c.h5", "--resume", "--epochs", "2")), 2,
                "not a plain file of its own")


def test_a_temporary_name_is_never_one_planted(tmp_path, monkeypatch):
    """Even a planted link at the very name drawn is passed over, never written through."""
    names = iter(["feed", "f00d"])
    monkeypatch.setattr("secrets.token_hex", lambda _: next(names))
    (tmp_path / "victim").write_text("kept")
    (tmp_path / "out.7.feed.tmp").symlink_to(tmp_path / "victim")
    tmp, f = create_new(str(tmp_path / "out.7"))
    with f:
        f.write(b"new")
    assert tmp.endswith("out.7.f00d.tmp") and (tmp_path / "victim").read_text() == "kept"


def test_an_output_that_is_a_link_is_replaced_not_written_through(ddl, work):
    (work / "m.jsonl").symlink_to(work / "victim.txt")
    assert ddl(*train("--metrics", "m.jsonl", "--overwrite"))[0] == 0
    assert (work / "victim.txt").read_text() == "not yours\n"
    assert not (work / "m.jsonl").is_symlink() and "train_loss" in (work / "m.jsonl").read_text()


@pytest.mark.parametrize("option, name", [("--metrics", "m.jsonl"), ("--plot", "p.png"),
                                          ("--timeline", "t.json")])
def test_every_output_is_claimed(option, name, ddl, work):
    with checkpoint.Lock(work / name, option), untouched(work):
        refused(ddl(*train(option, name)), 2, f"{name} is being written by another job",
                f"choose another {option}")
    (work / f"{name}.lock").write_text("pid 1 on a host that died")    # a stale claim
    assert ddl(*train(option, name))[0] == 0
    assert not (work / f"{name}.lock").exists()


def test_special_files_are_refused_not_waited_for(work):
    os.mkfifo(work / "pipe")
    with untouched(work):
        for args, words in ((["evaluate", "--data", "data.h5", "--checkpoint", "pipe"],
                             ["pipe is not a plain file"]),
                            (["evaluate", "--data", "pipe", "--checkpoint", "c.h5"],
                             ["pipe: not a plain file"]),
                            (train("--metrics", "/dev/null"), ["--metrics /dev/null is not a "
                                                               "plain file"])):
            done = subprocess.run([sys.executable, "-m", "ddl", *args], capture_output=True,
                                  text=True, timeout=60)
            refused((done.returncode, done.stdout + done.stderr), 2, *words)


# --- 4. a checkpoint is data, never code --------------------------------------------------------
@pytest.mark.parametrize("command", [["evaluate"], ["predict", "--index", "3"]])
def test_a_checkpoint_runs_no_code_it_names(command, ddl, work):
    with untouched(work):
        refused(ddl(*command, "--data", "data.h5", "--checkpoint", "n.h5"), 2,
                f"n.h5 was saved from the model file {work}/net.py",
                f"--model {work}/net.py:make", "--trust-model")
    assert not (work / "ran").exists()
    for trust in (["--model", "net.py:make"], ["--trust-model"]):
        code, output = ddl(*command, "--data", "data.h5", "--checkpoint", "n.h5", *trust)
        assert code == 0 and "Error" not in output, output
        assert (work / "ran").exists()
        (work / "ran").unlink()


def test_loading_a_checkpoint_runs_nothing(work):
    tree = checkpoint.load(work / "n.h5")
    assert tree["architecture"]["model"] == f"{work}/net.py:make" and not (work / "ran").exists()
    source = open(checkpoint.__file__).read()
    assert not any(word in source for word in ("pickle", "eval(", "exec(", "import_module"))


def test_a_changed_model_file_is_named(ddl, work):
    tree = checkpoint.load(work / "n.h5")
    assert len(tree["architecture"]["source_sha256"]) == 64
    (work / "net.py").write_text(NET.format(inputs=784).replace(
        "nn.Linear(784, num_classes)", "nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, num_classes)"
    ).replace("pathlib.Path(__file__).with_name('ran').touch()", ""))
    with untouched(work):
        refused(ddl(*train("--model", f"{work}/net.py:make", "--checkpoint", "n.h5", "--resume",
                           "--epochs", "2")), 2, f"{work}/net.py changed since n.h5 was saved")
        refused(ddl("evaluate", "--data", "data.h5", "--checkpoint", "n.h5", "--trust-model"),
                2, f"{work}/net.py changed since n.h5 was saved")
    (work / "net.py").write_text(NET.format(inputs=784).replace("num_classes))", "3))").replace(
        "pathlib.Path(__file__).with_name('ran').touch()", ""))
    with untouched(work):
        refused(ddl("evaluate", "--data", "data.h5", "--checkpoint", "n.h5", "--trust-model"),
                2, f"{work}/net.py changed since n.h5 was saved: model", "(3,) per image")


# --- 5. data files validated, not trusted -------------------------------------------------------
def _edited(src, path, attrs=(), splits=None):
    """A copy of data file `src` at `path` with attributes `attrs` set, and `splits`
    {name: (images, labels)} replacing those splits."""
    with h5py.File(src) as s, h5py.File(path, "w") as f:
        f.attrs.update(s.attrs)
        f.attrs.update(dict(attrs))
        for name in ("train", "test"):
            images, labels = (splits or {}).get(name, (s[f"{name}/images"][:256],
                                                        s[f"{name}/labels"][:256]))
            f[f"{name}/images"], f[f"{name}/labels"] = images, labels
    return path


@pytest.mark.parametrize("attrs, splits, words", [
    ({"num_classes": "ten"}, None, ["attribute 'num_classes' is 'ten', not an integer"]),
    ({"num_classes": 10 ** 12}, None, ["'num_classes' is 1000000000000, outside 2..65536"]),
    ({"num_classes": 1, "class_names": ["0"]}, None, ["'num_classes' is 1, outside 2..65536"]),
    ({"mean": "dark"}, None, ["attribute 'mean' is", "not numbers"]),
    ({"format_version": [1, 2]}, None, ["'format_version' is [1, 2], not an integer"]),
    ({"class_names": "digits"}, None, ["'class_names' is not a list of names"]),
    ({}, {"test": (np.zeros((256, 1, 28, 28), np.uint8), np.full(256, 2 ** 40))},
     ["'test/labels' row 0 is 1099511627776, outside 0..9"]),
    ({}, {"test": (np.zeros((0, 1, 28, 28), np.uint8), np.zeros(0, np.uint8))},
     ["'test' holds no images"]),
    ({}, {split: (np.zeros((256, 1, 0, 28), np.uint8), np.zeros(256, np.uint8))
          for split in ("train", "test")}, ["images' are 1x0x28: no pixels"]),
])
def test_lying_data_files_are_refused_before_any_work(attrs, splits, words, ddl, work,
                                                      small_h5):
    bad = _edited(small_h5, work / "bad.h5", attrs, splits)
    with untouched(work):
        refused(ddl(*train("--data", bad)), 2, *words)
        refused(ddl("evaluate", "--data", bad, "--checkpoint", "c.h5"), 2, *words)


def test_a_file_declaring_more_than_it_holds_is_refused_at_once(ddl, work):
    with h5py.File(work / "big.h5", "w") as f:        # 3 KB, declaring 784 GB of images
        f.attrs.update(format_version=2, num_classes=10, mean=[0.1], std=[0.3])
        for split in ("train", "test"):
            f.create_dataset(f"{split}/images", (10 ** 9, 1, 28, 28), np.uint8,
                             chunks=(1000, 1, 28, 28))
            f.create_dataset(f"{split}/labels", (10 ** 9,), np.uint8)
    with untouched(work):
        refused(ddl(*train("--data", "big.h5")), 2, "'train/images' declares (1000000000, 1, "
                                                    "28, 28) but its data is not all in the file")


def test_a_checkpoint_whose_architecture_lies_sizes_nothing(ddl, work):
    tree = checkpoint.load(work / "c.h5")
    for arch in ({"in_shape": [1, 10 ** 6, 10 ** 6, 5]}, {"num_classes": 10 ** 12},
                 {"in_shape": [1, -28, 28]}, {"num_classes": "ten"}):
        checkpoint.save(work / "lie.h5", dict(tree, architecture=dict(tree["architecture"],
                                                                      **arch)))
        with untouched(work):
            refused(ddl("evaluate", "--data", "data.h5", "--checkpoint", "lie.h5"), 2,
                    "lie.h5: damaged checkpoint")


def test_prepare_refuses_sets_that_cannot_be_learnt(ddl, tmp_path):
    (x, y), (xt, yt) = colour_images(64, 0), colour_images(32, 1)
    cases = {"one.npz": dict(x_train=x, y_train=np.zeros_like(y), x_test=xt, y_test=yt),
             "flat.npz": dict(x_train=x[:, :0], y_train=y, x_test=xt[:, :0], y_test=yt),
             "far.npz": dict(x_train=x, y_train=np.where(y == 3, 2 ** 40, y), x_test=xt,
                             y_test=yt)}
    for name, arrays in cases.items():
        np.savez(tmp_path / name, **arrays)
    with untouched(tmp_path):
        refused(ddl("prepare", "--npz", tmp_path / "one.npz", "--out", tmp_path / "o.h5"), 2,
                "a single class")
        refused(ddl("prepare", "--npz", tmp_path / "flat.npz", "--out", tmp_path / "o.h5"), 2,
                "no pixels")
        refused(ddl("prepare", "--npz", tmp_path / "far.npz", "--out", tmp_path / "o.h5"), 2,
                "train label 1099511627776 at row", "K <= 65536")


@pytest.fixture
def folder(colour_folder, tmp_path):
    shutil.copytree(colour_folder, tmp_path / "f")
    return tmp_path / "f"


def test_a_fifo_in_an_image_folder_is_refused_not_waited_for(folder, tmp_path):
    os.mkfifo(folder / "train" / "cat" / "pipe.png")
    with untouched(tmp_path):
        done = subprocess.run([sys.executable, "-m", "ddl", "prepare", "--image-folder", folder,
                               "--out", tmp_path / "o.h5"], capture_output=True, text=True,
                              timeout=60)
        refused((done.returncode, done.stdout + done.stderr), 2, "pipe.png: not a plain file")


def test_sixteen_bit_images_are_refused_not_clipped(ddl, folder, tmp_path):
    from PIL import Image
    Image.fromarray(np.full((32, 32), 40000, np.uint16)).save(folder / "test" / "dog" / "x.png")
    with untouched(tmp_path):
        refused(ddl("prepare", "--image-folder", folder, "--out", tmp_path / "o.h5"), 2,
                "x.png: pixels of more than 8 bits (Pillow mode I;16)", "convert the images")


def test_folder_names_that_are_not_utf8_are_kept_escaped(ddl, folder, tmp_path):
    for split in ("train", "test"):
        os.rename(os.fsencode(folder / split / "cat"), os.fsencode(folder / split) + b"/caf\xe9")
    out = tmp_path / "o.h5"
    code, output = ddl("prepare", "--image-folder", folder, "--out", out)
    assert code == 0, output
    with h5py.File(out) as f:
        assert [n.decode() if isinstance(n, bytes) else n
                for n in f.attrs["class_names"]] == ["caf\\xe9", "dog", "frog", "ship"]


# --- 6. a stop during evaluation ----------------------------------------------------------------
def test_a_stop_during_evaluation_saves_after_the_last_step(work, monkeypatch):
    from ddl import train as loop
    from ddl.errors import Stopped
    real = loop.evaluate

    def interrupted(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args)
    monkeypatch.setattr(loop, "evaluate", interrupted)
    cfg = Config(model="mlp", data="data.h5", subset=256, batch_size=64, epochs=1, quiet=True,
                 checkpoint="s.h5")
    with pytest.raises(Stopped, match="stopped by SIGTERM after step 4 .epoch 1, step 4 of 4"):
        run(cfg)
    assert checkpoint.load("s.h5")["step"] == 4
    monkeypatch.setattr(loop, "evaluate", real)
    history, _ = run(Config(**dict(vars(cfg), resume=True)))
    assert [r["epoch"] for r in history] == [1] and checkpoint.load("s.h5")["step"] == 0


# --- 7. non-finite buffers ----------------------------------------------------------------------
def test_an_overflowing_running_statistic_is_never_saved(ddl, work, monkeypatch):
    (work / "bn.py").write_text(
        "from ddl import nn\n\n\ndef make(in_shape, num_classes):\n"
        "    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(),\n"
        "                         nn.Linear(2 * 26 * 26, num_classes))\n")

    def overflow(self):
        for _, value in self.model.named_buffers():
            if value.dtype.kind == "f":
                value[...] = np.inf
    monkeypatch.setattr("ddl.parallel.Replicas.average_buffers", overflow)
    with untouched(work):
        refused(ddl(*train("--model", "bn.py:make", "--checkpoint", "b.h5")), 3,
                "the weights or the test loss turned NaN or inf", "b.h5 was not written")


# --- 8. a damaged kernel cache ------------------------------------------------------------------
def test_damaged_cache_files_are_removed_for_a_rebuild(tmp_path):
    from ddl.kernels.jit import _drop_damaged
    good = pickle.dumps("0.60") + pickle.dumps(("stamp", {"key": "k.1.nbc"}))
    data = pickle.dumps(("library", b"\0" * 1000))
    files = {"ok.nbi": good, "ok.1.nbc": data, "cut.nbi": good[:len(good) - 9],
             "cut.1.nbc": data[:500], "empty.nbi": b"", "junk.2.nbc": b"\xff\xfe"}
    (tmp_path / "sub").mkdir()
    for name, content in files.items():
        (tmp_path / "sub" / name).write_bytes(content)
    removed = _drop_damaged(str(tmp_path))
    assert sorted(os.path.basename(p) for p in removed) == ["cut.1.nbc", "cut.nbi", "empty.nbi",
                                                           "junk.2.nbc"]
    assert sorted(os.listdir(tmp_path / "sub")) == ["ok.1.nbc", "ok.nbi"]


def test_what_numba_still_cannot_load_is_one_line_naming_the_folder(monkeypatch):
    from ddl.kernels import jit

    class Broken:
        def compile(self, _):
            raise pickle.UnpicklingError("pickle data was truncated")
    monkeypatch.setattr(jit, "_KERNELS", [(Broken(), ["void(T[:])"])])
    with pytest.raises(KernelCacheError, match=f"kernel cache {jit.cache_dir()} is damaged .*"
                                               f"remove that folder"):
        jit.warm()


# --- 9. models and options that cannot train ----------------------------------------------------
@pytest.mark.parametrize("body, words", [
    ("Cut(num_classes)", ["has no parameters"]),
    ("(lambda r: nn.Sequential(nn.Flatten(), nn.Linear(784, 784), r, nn.Linear(784, "
     "num_classes), r))(nn.ReLU())", ["uses one layer twice, as 2 and as 4"]),
])
def test_models_that_cannot_train_are_one_line(body, words, ddl, work):
    (work / "odd.py").write_text(
        "from ddl import nn\n\n\nclass Cut(nn.Module):\n    def __init__(self, k):\n"
        "        super().__init__()\n        self.k = k\n\n    def forward(self, x):\n"
        "        return x.reshape(len(x), -1)[:, :self.k]\n\n\n"
        f"def make(in_shape, num_classes):\n    return {body}\n")
    with untouched(work):
        refused(ddl(*train("--model", "odd.py:make")), 2, *words)


def test_a_shift_beyond_the_image_is_one_line(ddl, work):
    with untouched(work):
        refused(ddl(*train("--shift", "28")), 2, "--shift 28 moves the 1x28x28 images out of "
                                                 "the frame: it must be less than 28")

"""HDF5 checkpoints: nested trees round-trip, a failed write keeps the previous file, every bad
file is one line naming it, and the lock keeps a second job out."""
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from conftest import MNIST
from ddl import checkpoint
from ddl.errors import CheckpointError, OutputError
from ddl.models import build
from ddl.optim import SGD


def tree():
    model = build("mlp", *MNIST, seed=0)
    opt = SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        p.grad[...] = 1
    opt.step()
    return dict(model=model.state_dict(), optimizer=opt.state_dict(), schedule={"last_epoch": 3},
                epoch=3, step=7, partial={"loss_sum": 1.5, "seconds": 0.25},
                history=[{"epoch": 1, "test_accuracy": 0.5}], config={"model": "mlp"},
                architecture={"model": "mlp", "in_shape": [1, 28, 28], "num_classes": 10},
                data={"train": 60000}, world_size=2)


def test_round_trip(tmp_path):
    saved = tree()
    checkpoint.save(tmp_path / "c.h5", saved)
    got = checkpoint.load(tmp_path / "c.h5")
    assert got["epoch"] == 3 and got["step"] == 7 and got["partial"] == saved["partial"]
    assert got["history"] == saved["history"]
    assert got["config"] == {"model": "mlp", "subset_draw": "first"} and got["world_size"] == 2
    assert got["architecture"] == saved["architecture"]
    for k, v in saved["model"].items():
        np.testing.assert_array_equal(got["model"][k], v)
    assert sorted(got["optimizer"]["state"]) == [0, 1, 2, 3]        # positions come back as ints
    fresh = SGD(build("mlp", *MNIST, seed=1).parameters(), lr=0.5)
    fresh.load_state_dict(got["optimizer"])
    assert fresh.momentum == 0.9 and fresh.lr == 0.1


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c.h5"
    checkpoint.save(path, tree())

    def crash(group, tree):
        raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint, "_write", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path, {"epoch": 4})
    assert checkpoint.load(path)["epoch"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["c.h5"]          # no temporary left behind


def test_format_1_reads_as_an_mnist_model_at_the_start_of_an_epoch(tmp_path, monkeypatch):
    """Checkpoints from before ddl took other images and checkpointed mid-epoch: the model took
    MNIST's images, the data's statistics were one number each, there was no step and no partial
    sums, and the run had no compiled kernels and no augmentation."""
    old = tree()
    del old["architecture"], old["step"], old["partial"]
    old["data"] = {"train": 60000, "test": 10000, "classes": 10, "mean": 0.13, "std": 0.31}
    monkeypatch.setattr(checkpoint, "FORMAT_VERSION", 1)
    checkpoint.save(tmp_path / "c.h5", old)
    monkeypatch.undo()
    got = checkpoint.load(tmp_path / "c.h5")
    assert got["architecture"] == {"model": "mlp", "in_shape": [1, 28, 28], "num_classes": 10}
    assert got["data"] == dict(old["data"], mean=[0.13], std=[0.31], shape=[1, 28, 28],
                               path="data/mnist.h5", class_names=None, fingerprint=None)
    assert got["epoch"] == 3 and got["step"] == 0 and got["partial"]["loss_sum"] == 0
    assert got["config"] == {"model": "mlp", "kernels": "numpy", "shift": 0, "flip": False,
                             "subset_draw": "first"}


def test_leftovers_of_a_killed_write_are_removed(tmp_path):
    """A write killed between creating its temporary file and the rename leaves PATH.PID.RANDOM.tmp;
    the next job removes it, but not one of a process that still runs (a write under way)."""
    from ddl.atomic import remove_leftovers
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f"c.h5.{dead.pid}.5eed.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / f"c.h5.{os.getpid()}.5eed.tmp").write_bytes(b"being written")
    (tmp_path / "c.h5.backup.tmp").write_bytes(b"the user's")
    assert remove_leftovers(tmp_path / "c.h5") == [f"c.h5.{dead.pid}.5eed.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"c.h5.{os.getpid()}.5eed.tmp", "c.h5.backup.tmp"])


def test_a_vanished_folder_is_one_line(tmp_path):
    with pytest.raises(OutputError, match=r"cannot write .*gone/c\.h5 \(No such file or dir"):
        checkpoint.save(tmp_path / "gone" / "c.h5", tree())


def _rewrite(path, change):
    with h5py.File(path, "a") as f:
        change(f)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


BAD = {
    "missing": (lambda p: p.unlink(), "checkpoint not found"),
    "folder": (lambda p: (p.unlink(), p.mkdir()), "is a folder"),
    "text": (lambda p: p.write_text("no"), "not an HDF5 file"),
    "truncated": (_truncate, "damaged checkpoint"),
    "a dataset": (lambda p: (p.unlink(), _rewrite(p, lambda f: f.create_group("train"))),
                  "not a ddl checkpoint (a dataset)"),
    "no marker": (lambda p: _rewrite(p, lambda f: f.attrs.__delitem__(checkpoint.MARKER)),
                  "not a ddl checkpoint (no 'ddl_checkpoint' attribute)"),
    "newer": (lambda p: _rewrite(p, lambda f: f.attrs.__setitem__(checkpoint.MARKER, 9)),
              "checkpoint format 9, but this ddl reads formats 1 and 2"),
    "no architecture": (lambda p: _rewrite(p, lambda f: f.attrs.__delitem__("architecture")),
                        "damaged checkpoint (no architecture)"),     # plain values: one attribute
    "no optimizer": (lambda p: _rewrite(p, lambda f: f.__delitem__("optimizer")),
                     "damaged checkpoint (no optimizer)"),
    "bad json": (lambda p: _rewrite(p, lambda f: f.attrs.__setitem__("epoch", "{")),
                 "damaged checkpoint"),
    "NaN weights": (lambda p: _rewrite(p, lambda f: f["model/1.bias"].__setitem__(0, np.nan)),
                    "holds NaN or inf weights"),
}


@pytest.mark.parametrize("damage", BAD)
def test_every_bad_file_is_one_line_naming_it(damage, tmp_path):
    path = tmp_path / "c.h5"
    checkpoint.save(path, tree())
    breaker, words = BAD[damage]
    breaker(path)
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(path)
    assert str(err.value).startswith(str(path)) and words in str(err.value)
    assert "\n" not in str(err.value)


def test_lock_keeps_a_second_job_out(tmp_path):
    path = tmp_path / "c.h5"
    with checkpoint.Lock(path):
        with pytest.raises(CheckpointError, match=r"c\.h5 is being written by another job \(pid"):
            checkpoint.Lock(path)
        assert (tmp_path / "c.h5.lock").exists()
    assert list(tmp_path.iterdir()) == []                       # released: the file is gone
    (tmp_path / "c.h5.lock").write_text("pid 1 on a machine that crashed")
    with checkpoint.Lock(path):                                 # a stale file holds no lock
        assert "pid" in (tmp_path / "c.h5.lock").read_text()
    assert list(tmp_path.iterdir()) == []

"""HDF5 checkpoints: nested trees round-trip, a failed write keeps the previous file, bad files."""
import numpy as np
import pytest

from ddl import checkpoint
from ddl.models import build
from ddl.optim import SGD


def tree():
    model = build("mlp", seed=0)
    opt = SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        p.grad[...] = 1
    opt.step()
    return dict(model=model.state_dict(), optimizer=opt.state_dict(), epoch=3,
                history=[{"epoch": 1, "test_accuracy": 0.5}], config={"model": "mlp"})


def test_round_trip(tmp_path):
    saved = tree()
    checkpoint.save(tmp_path / "c.h5", saved)
    got = checkpoint.load(tmp_path / "c.h5")
    assert got["epoch"] == 3 and got["history"] == saved["history"]
    assert got["config"] == {"model": "mlp"}
    for k, v in saved["model"].items():
        np.testing.assert_array_equal(got["model"][k], v)
    assert sorted(got["optimizer"]["state"]) == [0, 1, 2, 3]        # positions come back as ints
    fresh = SGD(build("mlp", seed=1).parameters(), lr=0.5)
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


def test_bad_files(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="not found"):
        checkpoint.load(tmp_path / "none.h5")
    junk = tmp_path / "junk.h5"
    junk.write_text("no")
    with pytest.raises(checkpoint.CheckpointError, match="junk.h5"):
        checkpoint.load(junk)

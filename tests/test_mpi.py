"""The distributed path, through real `mpiexec -n 2` and `-n 4` jobs (tests/mpi_jobs.py)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import MNIST, rank_env, run_mpi
from ddl import checkpoint
from ddl.comm import SingleCommunicator
from ddl.models import build

JOBS = Path(__file__).with_name("mpi_jobs.py")
SMALL = ["model=seed-cnn", "subset=512", "batch_size=64", "epochs=1", "quiet=1", "lr=0.05",
         "shift=1"]
# resnet-mini on the synthetic colour images (conftest): 3 epochs of 4 steps learn them.
COLOUR = ["model=resnet-mini", "batch_size=64", "epochs=3", "quiet=1", "lr=0.05", "shift=0"]


def job(n, name, out, *pairs, timeout=120):
    done = run_mpi(n, [JOBS, name, out, *pairs], timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.parametrize("n", [2, 4])
def test_communicator_verbs(n, tmp_path):
    job(n, "comm", tmp_path)
    for r in range(n):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert got["size"] == n
        assert got["allreduce"] == [n * (n + 1) / 2] * 5
        assert got["imax"] == [n - 1] * 3
        assert got["bcast"] == [0, 1, 2, 3]
        assert got["obj"] == n * (n - 1) // 2
        assert got["gathered"] == [10 * i for i in range(n)]
        assert got["bcast_obj"] == {"from": 0}


def test_step_signals_travel_with_the_gradients():
    """The loss and flags ride in the gradients' all-reduce: averaged, set if any rank set them,
    and the loss NaN (diverged) when any gradient of any rank is not finite."""
    from ddl.parallel import Replicas, Signals
    model = build("mlp", (1, 28, 28), 10)

    class TwoRanks:             # rank 0 of two; rank 1's loss is 3 and it received a SIGTERM
        rank, size = 0, 2
        hosts = ("vm", "vm")

        def bcast(self, buf, root=0, what=""):
            return buf

        def bcast_obj(self, obj, root=0, what=""):
            return obj

        def iallreduce(self, buf, op="sum", what=""):
            at = (buf.ctypes.data - replicas.reduced.ctypes.data) // buf.itemsize
            buf += other[at:at + buf.size]
            return SingleCommunicator().iallreduce(buf)
    replicas = Replicas(model, TwoRanks())
    other = np.zeros_like(replicas.reduced)
    other[:len(Signals._fields)] = Signals(loss=3.0, stop=True)
    replicas.zero_grad()
    assert replicas.allreduce_grads(1.0) == Signals(2.0, stop=True, save=False)
    assert replicas.allreduce_grads(1.0, save=True) == Signals(2.0, stop=True, save=True)
    other[-1] = np.nan
    assert replicas.allreduce_grads(1.0).diverged


def test_divergence_is_detected(tmp_path):
    job(2, "diverge", tmp_path)
    for r in range(2):
        assert "diverged" in (tmp_path / f"rank{r}.txt").read_text()


@pytest.mark.parametrize("rank3, named", [("silent", "rank 3"), ("waiting", "ranks 2, 3")])
def test_the_watchdog_names_the_ranks_that_did_not_arrive(rank3, named, tmp_path):
    """A rank that answers from an earlier collective waits there for a silent one, and is named
    only when no rank is silent."""
    done = run_mpi(4, [JOBS, "behind", tmp_path, rank3], timeout=60)
    assert done.returncode == 5, done.stderr
    said = (tmp_path / "rank0.txt").read_text()
    assert said == f"{named} did not reach the second wait within 1 s"


@pytest.fixture(scope="module")
def one_process(mnist_h5, tmp_path_factory):
    out = tmp_path_factory.mktemp("n1")
    job(1, "train", out, f"data={mnist_h5}", f"checkpoint={out / 'ckpt.h5'}", *SMALL)
    return out


@pytest.mark.parametrize("n", [2, 4])
def test_n_ranks_follow_one_process(n, one_process, mnist_h5, tmp_path):
    """Same seed and global batch: N ranks end where 1 process ends, up to float rounding in the
    gradient sum (8 SGD steps; tolerance 1e-5 relative to the weights' scale)."""
    job(n, "train", tmp_path, f"data={mnist_h5}", *SMALL)
    ranks = [np.load(tmp_path / f"params{r}.npy") for r in range(n)]
    for r in range(1, n):
        assert np.array_equal(ranks[0], ranks[r]), f"rank {r} differs from rank 0"
    single = np.load(one_process / "params0.npy")
    start = np.concatenate([p.data.ravel()
                            for p in build("seed-cnn", *MNIST, seed=0).parameters()])
    assert np.abs(single - start).max() > 1e-3            # training moved the weights
    np.testing.assert_allclose(ranks[0], single, rtol=0, atol=1e-5 * np.abs(single).max())
    h1 = json.loads((one_process / "history.json").read_text())[0]
    hn = json.loads((tmp_path / "history.json").read_text())[0]
    assert hn["world_size"] == n
    assert hn["train_loss"] == pytest.approx(h1["train_loss"], rel=1e-5)
    assert hn["test_accuracy"] == pytest.approx(h1["test_accuracy"], abs=2e-4)


@pytest.fixture(scope="module")
def colour_one_process(colour_h5, tmp_path_factory):
    """resnet-mini trained on the colour images by one process. BatchNorm normalises each
    micro-batch: here the halves of each batch of 64 that two ranks take."""
    out = tmp_path_factory.mktemp("colour1")
    job(1, "train", out, f"data={colour_h5}", f"checkpoint={out / 'ckpt.h5'}", "micro_batch=32",
        *COLOUR)
    return out


@pytest.mark.parametrize("source", ["npz", "image-folder"])
def test_colour_images_on_two_ranks_follow_one_process(source, colour_one_process, colour_h5,
                                                       colour_folder_h5, tmp_path):
    """A user's 3-channel data set, brought in as an .npz or as an image folder, trains a
    residual network with BatchNorm on 2 ranks to the weights, running statistics and figures
    of one process, up to float rounding, and learns it."""
    data = colour_h5 if source == "npz" else colour_folder_h5
    job(2, "train", tmp_path, f"data={data}", f"checkpoint={tmp_path / 'ckpt.h5'}", *COLOUR)
    ranks = [np.load(tmp_path / f"params{r}.npy") for r in range(2)]
    assert np.array_equal(ranks[0], ranks[1])
    single = np.load(colour_one_process / "params0.npy")
    np.testing.assert_allclose(ranks[0], single, rtol=0, atol=1e-5 * np.abs(single).max())
    one, two = (checkpoint.load(folder / "ckpt.h5") for folder in (colour_one_process, tmp_path))
    assert one["architecture"] == two["architecture"] == dict(
        model="resnet-mini", in_shape=[3, 32, 32], num_classes=4)
    for key, value in one["model"].items():                  # the buffers too
        np.testing.assert_allclose(two["model"][key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    for h1, h2 in zip(one["history"], two["history"]):
        assert h2["train_loss"] == pytest.approx(h1["train_loss"], rel=1e-5)
        assert h2["test_accuracy"] == pytest.approx(h1["test_accuracy"], abs=1e-9)
    assert one["history"][-1]["test_accuracy"] == 1.0


@pytest.mark.parametrize("n, trained, data", [(2, "one_process", "mnist_h5"),
                                              (4, "one_process", "mnist_h5"),
                                              (2, "colour_one_process", "colour_h5")])
def test_distributed_evaluation_is_exact(n, trained, data, request, tmp_path):
    ckpt, data = request.getfixturevalue(trained) / "ckpt.h5", request.getfixturevalue(data)
    job(1, "evaluate", tmp_path / "1", f"checkpoint={ckpt}", f"data={data}")
    job(n, "evaluate", tmp_path / "n", f"checkpoint={ckpt}", f"data={data}")
    single = json.loads((tmp_path / "1" / "eval.json").read_text())
    multi = json.loads((tmp_path / "n" / "eval.json").read_text())
    assert multi["accuracy"] == single["accuracy"]          # counts: exactly equal
    assert multi["loss"] == pytest.approx(single["loss"], rel=1e-6)


@pytest.mark.parametrize("model, data, subset, compress", [
    ("seed-cnn", "small_h5", 256, "none"), ("resnet-mini", "colour_h5", 128, "none"),
    ("ref-cnn", "small_h5", 256, "powersgd")])
def test_resume_is_bit_identical(model, data, subset, compress, request, tmp_path):
    """Also with PowerSGD, whose error feedback and warm start the checkpoint keeps."""
    pairs = [f"model={model}", f"data={request.getfixturevalue(data)}", f"subset={subset}",
             "batch_size=64", "epochs=2", "quiet=1", f"compress={compress}"]
    job(2, "train", tmp_path / "full", *pairs, f"checkpoint={tmp_path / 'full.h5'}")
    job(2, "interrupt", tmp_path / "cut", *pairs, f"checkpoint={tmp_path / 'cut.h5'}")
    assert checkpoint.load(tmp_path / "cut.h5")["epoch"] == 1
    job(2, "train", tmp_path / "resumed", *pairs, f"checkpoint={tmp_path / 'cut.h5'}", "resume=1")
    full, resumed = checkpoint.load(tmp_path / "full.h5"), checkpoint.load(tmp_path / "cut.h5")
    assert resumed["epoch"] == 2
    for key, value in full["model"].items():
        assert np.array_equal(value, resumed["model"][key]), key
    for i, state in full["optimizer"]["state"].items():
        for name, value in state.items():
            assert np.array_equal(value, resumed["optimizer"]["state"][i][name])
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    for key, value in full["exchange"].items():
        assert np.array_equal(value, resumed["exchange"][key]), key


def test_resume_on_another_world_size(small_h5, tmp_path):
    pairs = [f"data={small_h5}", "subset=256", "batch_size=64", "epochs=2", "quiet=1",
             f"checkpoint={tmp_path / 'c.h5'}"]
    job(4, "interrupt", tmp_path / "a", *pairs)
    done = job(2, "train", tmp_path / "b", *pairs, "resume=1", "quiet=0")
    assert "resuming" in done.stderr and "2 rank(s) (was 4)" in done.stderr
    history = checkpoint.load(tmp_path / "c.h5")["history"]
    assert [(h["epoch"], h["world_size"]) for h in history] == [(1, 4), (2, 2)]


def test_exception_on_one_rank_aborts_the_job(mnist_h5, tmp_path):
    start = time.monotonic()
    done = run_mpi(4, [JOBS, "fail", tmp_path, "--data", mnist_h5, "--subset", "2048",
                       "--batch-size", "64", "--epochs", "5"], timeout=60)
    assert done.returncode != 0
    assert time.monotonic() - start < 30
    assert done.stderr.count("rank 1: ZeroDivisionError: injected failure on rank 1") == 1


def test_killed_rank_ends_the_job(mnist_h5, tmp_path):
    from ddl.launch import find_mpiexec
    cmd = [find_mpiexec(), "-n", "4", sys.executable, JOBS, "train", tmp_path,
           f"data={mnist_h5}", "batch_size=64", "epochs=50", "quiet=1"]
    proc = subprocess.Popen(list(map(str, cmd)), env=rank_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "pid2").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "job never started"
            time.sleep(0.2)
        time.sleep(1.0)                                      # let it get into training
        os.kill(int((tmp_path / "pid2").read_text()), signal.SIGKILL)
        killed = time.monotonic()
        code = proc.wait(timeout=30)
        assert code != 0
        assert time.monotonic() - killed < 15
    finally:
        if proc.poll() is None:
            proc.kill()


def test_short_real_run_on_two_ranks(mnist_h5, tmp_path):
    """A tenth of an epoch of real MNIST on 2 ranks already beats chance by far."""
    job(2, "train", tmp_path, f"data={mnist_h5}", "subset=6000", "batch_size=64", "epochs=1",
        "quiet=1", "lr=0.05")
    history = json.loads((tmp_path / "history.json").read_text())
    assert history[0]["test_accuracy"] > 0.85

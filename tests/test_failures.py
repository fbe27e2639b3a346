"""Failures that are seen and survived, through real `ddl launch` jobs: a hung rank is named
within the timeout, SIGTERM stops every rank after one step with a checkpoint there and --resume
gives the uninterrupted run's weights bit for bit, a rank killed outright is restarted from the
last checkpoint to the same weights, and a killed launcher leaves nothing running."""
import os
import re
import shutil
import signal
import time

import numpy as np
import pytest

from conftest import processes, refused, run_ddl, start, wait_for
from ddl import checkpoint
from ddl.config import Config
from ddl.step import dropout_layers, seed_dropout
from ddl.train import run

STEPS = 200                                     # steps per epoch: 12,800 images, batch 64


def train_args(mnist_h5, ckpt, *more):
    """A run of 400 steps of the mlp, a checkpoint every 20: a second or two on 2 ranks. (No
    shifts: the float drift bound of `assert_same_run` was measured without them.)"""
    return ["train", "--data", mnist_h5, "--model", "mlp", "--subset", STEPS * 64,
            "--batch-size", "64", "--epochs", "2", "--checkpoint", ckpt,
            "--checkpoint-every", "20", "--shift", "0", "--quiet", *more]


def ranks_of(folder, n, proc):
    """{rank: pid} of the n ranks of `proc`'s job, whose command line names `folder`."""
    found = {}
    wait_for(lambda: found.update({r: p for p, r in processes(str(folder)).items()
                                   if r is not None}) or len(found) == n, proc)
    return found


@pytest.fixture
def reaper(tmp_path):
    """Whatever a test leaves running under its folder is killed (a stopped rank, an orphan)."""
    yield
    for pid in processes(str(tmp_path)):
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def uninterrupted(mnist_h5, tmp_path_factory):
    """The checkpoint at the end of the reference run on 2 ranks."""
    ckpt = tmp_path_factory.mktemp("uninterrupted") / "c.h5"
    done = run_ddl(["launch", "-n", "2", "--", *train_args(mnist_h5, ckpt)])
    assert done.returncode == 0, done.stderr
    return checkpoint.load(ckpt)


def assert_same_run(got, want, exact=True):
    """Same weights and optimizer state as `want`, bit for bit, or up to float rounding in the
    gradient sums (380 steps of it: 4e-4 of the largest weight at most, measured)."""
    assert got["epoch"] == want["epoch"] and got["step"] == 0
    scale = max(np.abs(w).max() for w in want["model"].values())
    for key, w in want["model"].items():
        if exact:
            assert np.array_equal(got["model"][key], w), key
        else:
            np.testing.assert_allclose(got["model"][key], w, rtol=0, atol=1e-3 * scale)
    if exact:
        for i, state in want["optimizer"]["state"].items():
            for name, value in state.items():
                assert np.array_equal(got["optimizer"]["state"][i][name], value), (i, name)
    assert [h["epoch"] for h in got["history"]] == [1, 2]


@pytest.fixture(scope="module")
def stopped(mnist_h5, tmp_path_factory):
    """SIGTERM to `ddl launch -n 2` once training is under way: (status, its stderr, the folder
    holding c.h5 as the stop left it)."""
    folder = tmp_path_factory.mktemp("stopped")
    proc = start(["launch", "-n", "2", "--", *train_args(mnist_h5, folder / "c.h5")])
    wait_for(lambda: (folder / "c.h5").exists(), proc)       # the first checkpoint: step 20
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    shutil.copy(folder / "c.h5", folder / "stop.h5")
    return proc.returncode, err, folder


def test_sigterm_stops_every_rank_after_one_step_and_saves_it(stopped):
    code, err, folder = stopped
    assert code == 143, err
    state = checkpoint.load(folder / "stop.h5")
    assert state["epoch"] == 0 and 20 <= state["step"] < STEPS        # mid-epoch
    assert err.strip() == (f"stopped by SIGTERM after step {state['step']} (epoch 1, step "
                           f"{state['step']} of {STEPS}): {folder / 'c.h5'} saved there: "
                           f"--resume continues")
    assert state["schedule"]["last_epoch"] == state["step"]
    assert state["partial"]["loss_sum"] > 0


def test_resume_after_a_stop_is_bit_identical(stopped, uninterrupted, mnist_h5):
    _, _, folder = stopped
    done = run_ddl(["launch", "-n", "2", "--", *train_args(mnist_h5, folder / "c.h5", "--resume")])
    assert done.returncode == 0, done.stderr
    assert_same_run(checkpoint.load(folder / "c.h5"), uninterrupted)


def test_resume_after_a_stop_on_another_world_size(stopped, uninterrupted, mnist_h5, capfd):
    """One process takes over mid-epoch where 2 ranks stopped: the same global batches, so the
    same weights up to float rounding in the gradient sum."""
    _, _, folder = stopped
    step = checkpoint.load(folder / "stop.h5")["step"]
    history, _ = run(Config(data=str(mnist_h5), model="mlp", subset=STEPS * 64, batch_size=64,
                            epochs=2, shift=0, checkpoint=str(folder / "stop.h5"), resume=True))
    assert f"resuming {folder / 'stop.h5'} at epoch 1, step {step} of {STEPS}, 1 rank(s) (was 2)" \
        in capfd.readouterr().err
    got = checkpoint.load(folder / "stop.h5")
    assert_same_run(got, uninterrupted, exact=False)
    assert [h["world_size"] for h in history] == [1, 1]
    assert history[0]["train_loss"] == pytest.approx(uninterrupted["history"][0]["train_loss"],
                                                     rel=1e-5)


def test_a_killed_rank_is_restarted_from_the_checkpoint(uninterrupted, mnist_h5, tmp_path,
                                                        reaper):
    proc = start(["launch", "-n", "2", "--max-restarts", "2", "--",
                  *train_args(mnist_h5, tmp_path / "c.h5")])
    wait_for(lambda: (tmp_path / "c.h5").exists(), proc)
    os.kill(ranks_of(tmp_path, 2, proc)[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert err.count("ddl launch: the job failed (exit status") == 1, err
    assert f"restarting it from {tmp_path / 'c.h5'} (restart 1 of 2)" in err
    assert_same_run(checkpoint.load(tmp_path / "c.h5"), uninterrupted)


def test_a_restart_resumes_only_the_jobs_own_checkpoint(tmp_path, monkeypatch, capsys):
    """With --overwrite, a job that fails before its first save restarts as it was, not with
    --resume, which would continue the earlier run's checkpoint; once it has saved, --resume."""
    from ddl import launch
    ckpt = tmp_path / "c.h5"
    ckpt.write_bytes(b"an earlier run's")
    calls = []

    def attempt(nprocs, args, **where):
        calls.append(args)
        if len(calls) == 2:                 # the second attempt saves, then fails
            (tmp_path / "new").write_bytes(b"this job's")
            os.replace(tmp_path / "new", ckpt)
        return (0 if len(calls) == 3 else 1), False, ""
    monkeypatch.setattr(launch, "_run", attempt)
    args = ["train", "--checkpoint", str(ckpt), "--overwrite"]
    assert launch.launch(2, args, max_restarts=2) == 0
    assert calls == [args, args, ["train", "--checkpoint", str(ckpt), "--resume"]]
    err = capsys.readouterr().err
    assert "restarting it afresh: it had not saved a checkpoint yet (restart 1 of 2)" in err
    assert f"restarting it from {ckpt} (restart 2 of 2)" in err


def test_restarts_are_only_for_failures(mnist_h5, tmp_path):
    done = run_ddl(["launch", "-n", "2", "--max-restarts", "2", "--",
                    *train_args(mnist_h5, tmp_path / "c.h5", "--batch-size", "7")])
    refused((done.returncode, done.stderr), 2, "--batch-size 7")        # usage: not restarted
    done = run_ddl(["launch", "-n", "2", "--max-restarts", "1", "--", "train"])
    refused((done.returncode, done.stderr), 2, "--max-restarts needs `train ... --checkpoint")


def test_a_killed_launcher_leaves_nothing_running(mnist_h5, tmp_path, reaper):
    proc = start(["launch", "-n", "2", "--", *train_args(mnist_h5, tmp_path / "c.h5",
                                                         "--epochs", "50")])
    wait_for(lambda: (tmp_path / "c.h5").exists(), proc)
    assert len(processes(str(tmp_path))) >= 3                  # mpiexec and two ranks at least
    proc.kill()
    proc.wait()
    killed = time.monotonic()
    while processes(str(tmp_path)) and time.monotonic() - killed < 10:
        time.sleep(0.1)
    assert processes(str(tmp_path)) == {}


def _cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_stopped_rank_is_named_within_the_timeout(mnist_h5, tmp_path, reaper):
    """SIGSTOP of one rank of 4 (a paused VM, a stuck read): the others wait asleep, then the
    job ends with status 5 naming it, within 11 s with --timeout 6."""
    proc = start(["launch", "-n", "4", "--", *train_args(mnist_h5, tmp_path / "c.h5",
                                                         "--epochs", "50", "--timeout", "6")])
    wait_for(lambda: (tmp_path / "c.h5").exists(), proc)
    ranks = ranks_of(tmp_path, 4, proc)
    os.kill(ranks[3], signal.SIGSTOP)
    stopped = time.monotonic()
    time.sleep(1)
    before = {r: _cpu_seconds(ranks[r]) for r in range(3)}
    time.sleep(3)
    used = {r: _cpu_seconds(ranks[r]) - before[r] for r in range(3)}
    assert all(seconds < 0.3 for seconds in used.values()), used       # not a core each
    _, err = proc.communicate(timeout=30)
    took = time.monotonic() - stopped
    assert proc.returncode == 5, err
    assert took < 11, took
    errors = [line for line in err.splitlines() if line.startswith("Error: ")]
    # Stopped at a checkpoint step, the others wait in the checkpoint write's collective instead.
    assert len(errors) == 1 and re.fullmatch(
        r"Error: rank 3 did not reach the (gradient all-reduce|checkpoint write) of step \d+"
        r" within 6 s", errors[0]), err


def test_dropout_masks_follow_the_step_not_the_history():
    """A run resumed at any step draws the masks an uninterrupted one draws there."""
    from ddl import nn
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Dropout(0.3))
    layers = dropout_layers(model)
    x = np.ones((4, 8), np.float32)
    masks = {}
    for step in (1, 2, 1):
        seed_dropout(layers, 0, 3, step, 1)
        masks.setdefault(step, []).append(model(x))
    np.testing.assert_array_equal(masks[1][0], masks[1][1])
    assert not np.array_equal(masks[1][0], masks[2][0])
    seed_dropout(layers, 0, 3, 1, 2)                               # another rank
    assert not np.array_equal(model(x), masks[1][0])


def test_resume_with_no_checkpoint_yet_starts_afresh(small_h5, tmp_path, capfd):
    """Also over the metrics of an attempt that failed before its first checkpoint: a restart
    loop passes --resume, never --overwrite."""
    (tmp_path / "m.jsonl").write_text("an attempt's\n")
    cfg = Config(data=str(small_h5), model="mlp", subset=256, batch_size=64, epochs=1,
                 checkpoint=str(tmp_path / "c.h5"), metrics=str(tmp_path / "m.jsonl"),
                 resume=True)
    history, _ = run(cfg)
    assert "no checkpoint" in capfd.readouterr().err and len(history) == 1
    assert checkpoint.load(tmp_path / "c.h5")["epoch"] == 1
    assert (tmp_path / "m.jsonl").read_text().count("\n") == 1 and "attempt" not in (
        tmp_path / "m.jsonl").read_text()


@pytest.mark.parametrize("options, saved", [
    (dict(checkpoint_every=3), [(0, 3), (1, 0), (1, 2), (2, 0)]),        # steps 3 and 6 of 8
    (dict(checkpoint_seconds=1e-9), [(0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3),
                                     (2, 0)]),
])
def test_checkpoints_during_an_epoch(options, saved, small_h5, tmp_path, monkeypatch):
    """Every N steps of the run, or when the time has come; the epoch's last step is saved by
    the epoch's own checkpoint."""
    positions, save = [], checkpoint.save
    monkeypatch.setattr(checkpoint, "save", lambda path, tree: (
        positions.append((tree["epoch"], tree["step"])), save(path, tree)))
    run(Config(data=str(small_h5), model="mlp", subset=256, batch_size=64, epochs=2, quiet=True,
               checkpoint=str(tmp_path / "c.h5"), **options))
    assert positions == saved

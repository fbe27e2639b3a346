"""Promises of docs/training.md and docs/faults.md kept through whole training runs: replicas that
drift end the run with status 1, the NumPy kernels train as the compiled ones do, SIGHUP stops and
saves as SIGTERM does, a second signal ends the job at once, --timeout 0 waits for a slow rank,
--resume rewrites the metrics and the plot from the checkpoint's history, and `ddl launch` gives
each rank one thread."""
import json
import os
import signal
import time
from pathlib import Path

import pytest

from conftest import processes, rank_env, refused, run_ddl, run_mpi, start, wait_for
from ddl import checkpoint

JOBS = Path(__file__).with_name("mpi_jobs.py")


def small_run(data, *more):
    return ["--data", data, "--model", "mlp", "--subset", "512", "--batch-size", "64",
            "--quiet", "--shift", "0", *more]


def test_replicas_that_drift_end_the_run_with_status_1(mnist_h5, tmp_path):
    done = run_mpi(2, [JOBS, "drift", tmp_path, *small_run(mnist_h5, "--epochs", "2",
                                                           "--checkpoint", tmp_path / "c.h5")])
    refused((done.returncode, done.stdout + done.stderr), 1,
            "model replicas diverged across ranks: the parameters of rank(s) 1 differ")
    assert not (tmp_path / "c.h5").exists()      # the drifted epoch was not saved


def test_a_whole_run_on_the_numpy_kernels(mnist_h5, tmp_path):
    """`--kernels numpy` trains end to end on 2 ranks, and as the compiled kernels do: the same
    steps up to float rounding."""
    runs = {}
    for name in ("numpy", "numba"):
        metrics = tmp_path / f"{name}.jsonl"
        done = run_ddl(["train", *small_run(mnist_h5, "--model", "seed-cnn", "--epochs", "2",
                                            "--kernels", name, "--metrics", metrics)], n=2)
        assert done.returncode == 0, done.stderr
        runs[name] = [json.loads(line) for line in metrics.read_text().splitlines()]
    for numpy_epoch, numba_epoch in zip(runs["numpy"], runs["numba"]):
        assert numpy_epoch["train_loss"] == pytest.approx(numba_epoch["train_loss"], rel=1e-3)
        assert numpy_epoch["test_accuracy"] == pytest.approx(numba_epoch["test_accuracy"],
                                                             abs=0.005)
    assert runs["numpy"][-1]["test_accuracy"] > 0.4         # it learns (chance: 0.1)


def test_sighup_stops_and_saves_like_sigterm(mnist_h5, tmp_path):
    ckpt = tmp_path / "c.h5"
    proc = start(["train", *small_run(mnist_h5, "--subset", "60000", "--epochs", "5",
                                      "--checkpoint", ckpt, "--checkpoint-every", "20")])
    wait_for(ckpt.exists, proc)
    proc.send_signal(signal.SIGHUP)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 129, err
    step = checkpoint.load(ckpt)["step"]
    assert err.strip() == (f"stopped by SIGHUP after step {step} (epoch 1, step {step} of 937):"
                           f" {ckpt} saved there: --resume continues")


def test_a_second_signal_ends_the_job_at_once(mnist_h5, tmp_path):
    """The first SIGTERM asks for a stop after the step; a second, within that step (one of
    several seconds here), kills the process, and the last checkpoint stays whole."""
    ckpt = tmp_path / "c.h5"
    proc = start(["train", *small_run(mnist_h5, "--model", "resnet-mini", "--kernels", "numpy",
                                      "--batch-size", "512", "--micro-batch", "0",
                                      "--subset", "4096", "--checkpoint", ckpt,
                                      "--checkpoint-every", "1")])
    wait_for(ckpt.exists, proc, timeout=120)
    saved = checkpoint.load(ckpt)["step"]
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM, err
    assert time.monotonic() - sent < 2
    assert "stopped by" not in err
    assert checkpoint.load(ckpt)["step"] in (saved, saved + 1)


@pytest.mark.parametrize("timeout, status", [("0", 0), ("2", 5)])
def test_timeout_0_waits_for_a_slow_rank(timeout, status, mnist_h5, tmp_path):
    """Rank 1 arrives 4 s late at one all-reduce: --timeout 0 waits for it, --timeout 2 does
    not (so the delay is long enough to be seen; 2 s, not 1, so that a loaded machine's slow
    step is not taken for the hang)."""
    done = run_mpi(2, [JOBS, "late", tmp_path, "4",
                       *small_run(mnist_h5, "--epochs", "1", "--timeout", timeout)])
    assert done.returncode == status, done.stderr
    hung = "Error: rank 1 did not reach the gradient all-reduce of step 2 within 2 s"
    assert (hung in done.stderr.splitlines()) == bool(status), done.stderr


def test_resume_rewrites_the_metrics_and_the_plot_from_the_checkpoint(mnist_h5, tmp_path):
    files = dict(checkpoint=tmp_path / "c.h5", metrics=tmp_path / "m.jsonl",
                 plot=tmp_path / "p.png")
    outputs = [a for k, v in files.items() for a in (f"--{k}", v)]
    done = run_ddl(["train", *small_run(mnist_h5, "--epochs", "1", *outputs)])
    assert done.returncode == 0, done.stderr
    first = json.loads(files["metrics"].read_text())
    files["metrics"].write_text("lost\n")
    files["plot"].write_bytes(b"lost")
    done = run_ddl(["train", *small_run(mnist_h5, "--epochs", "2", "--resume", *outputs)])
    assert done.returncode == 0, done.stderr
    history = [json.loads(line) for line in files["metrics"].read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2] and history[0] == first
    assert files["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [h["epoch"] for h in checkpoint.load(files["checkpoint"])["history"]] == [1, 2]


def test_launch_gives_each_rank_one_thread(mnist_h5, tmp_path):
    """One BLAS, OpenMP and numba thread per rank, unless the user set a number."""
    env = {k: v for k, v in rank_env().items() if not k.endswith("_NUM_THREADS")}
    proc = start(["launch", "-n", "2", "--", "train",
                  *small_run(mnist_h5, "--subset", "60000", "--epochs", "5",
                             "--metrics", tmp_path / "m.jsonl")],
                 env=dict(env, MKL_NUM_THREADS="3"))
    try:
        ranks = {}
        wait_for(lambda: ranks.update({r: p for p, r in processes(str(tmp_path)).items()
                                       if r is not None}) or len(ranks) == 2, proc)
        for pid in ranks.values():
            environ = dict(v.split("=", 1) for v in
                           open(f"/proc/{pid}/environ").read().split("\0") if "=" in v)
            assert [environ.get(f"{k}_NUM_THREADS") for k in ("OMP", "OPENBLAS", "NUMBA")] \
                == ["1"] * 3
            assert environ["MKL_NUM_THREADS"] == "3"
    finally:
        proc.kill()
        proc.wait()
        for pid in processes(str(tmp_path)):
            os.kill(pid, signal.SIGKILL)

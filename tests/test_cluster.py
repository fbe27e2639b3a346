"""ddl on the user's own cluster: real Debian Open MPI and a real single-node Slurm on this
machine (`.ci/cluster.sh` installs and starts both). Every 2-rank run ends where one process
ends; a launcher without a matching MPI library is one line. Skipped where they are absent."""
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import MNIST, ROOT, needs, run, run_ddl, run_mpi
from ddl import checkpoint
from ddl.models import build

TINY = ["--model", "mlp", "--subset", "256", "--batch-size", "64", "--epochs", "1", "--quiet"]
OPENMPI = shutil.which("mpirun.openmpi")
HOST = socket.gethostname().split(".")[0]


def _slurm_here(patience=60):
    """Why Slurm cannot run a job on this machine now, or '' when it can. A Slurm just started
    (by .ci/cluster.sh) may take a while to answer and to call its node idle: `patience`
    seconds."""
    if not (shutil.which("srun") and shutil.which("sbatch") and shutil.which("salloc")):
        return "no Slurm client (bash .ci/cluster.sh starts a single-node Slurm)"
    deadline = time.monotonic() + patience
    while True:
        try:
            nodes = subprocess.run(["sinfo", "-h", "-N", "-n", HOST, "-o", "%t"],
                                   capture_output=True, text=True, timeout=10)
            state = nodes.stdout.split()[:1]
            if state in (["idle"], ["mix"]):
                return ""
            why = f"no idle Slurm node on {HOST} ({(nodes.stderr or nodes.stdout).strip()})"
        except subprocess.TimeoutExpired:
            why = "sinfo does not answer"
        if time.monotonic() > deadline:
            return f"{why} after {patience} s"
        time.sleep(2)


@pytest.fixture(scope="session")
def openmpi():
    if not OPENMPI:
        needs("openmpi", "no mpirun.openmpi (apt-get install openmpi-bin, or bash .ci/cluster.sh)")


@pytest.fixture(scope="session")
def slurm():
    missing = _slurm_here()
    if missing:
        needs("slurm", missing)


needs_openmpi = pytest.mark.usefixtures("openmpi")
needs_slurm = pytest.mark.usefixtures("slurm")


def openmpi_run(*args, **env):
    """`mpirun.openmpi -n 2 python ARGS`; the variables are Open MPI's own consent to run as
    root (CI's user), which `ddl launch` gives with --allow-run-as-root."""
    return run([OPENMPI, "--oversubscribe", "-n", "2", sys.executable, *args],
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", **env)


@pytest.fixture(scope="module")
def one_process(mnist_h5, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("one") / "c.h5"
    done = run_ddl(["train", "--data", mnist_h5, *TINY, "--checkpoint", ckpt])
    assert done.returncode == 0, done.stderr
    model = checkpoint.load(ckpt)["model"]
    start = build("mlp", *MNIST, seed=0).state_dict()
    assert max(np.abs(model[k] - start[k]).max() for k in model) > 1e-3   # training moved it
    return model


def assert_follows(one_process, done, ckpt, n=2):
    """N ranks, same seed and global batch: the weights of one process, up to float rounding
    in the gradient sum (as in test_mpi)."""
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    got = checkpoint.load(ckpt)
    assert got["history"][0]["world_size"] == n
    scale = max(np.abs(w).max() for w in one_process.values())
    for key, w in one_process.items():
        np.testing.assert_allclose(got["model"][key], w, rtol=0, atol=1e-5 * scale, err_msg=key)


def train_args(mnist_h5, ckpt):
    return ["train", "--data", mnist_h5, *TINY, "--checkpoint", ckpt]


@needs_openmpi
def test_open_mpi_mpirun(one_process, mnist_h5, tmp_path):
    done = openmpi_run("-m", "ddl", *train_args(mnist_h5, tmp_path / "c.h5"))
    assert_follows(one_process, done, tmp_path / "c.h5")


@needs_openmpi
def test_launch_through_open_mpi_with_a_hydra_hostfile(one_process, mnist_h5, tmp_path):
    """Hydra's spelling with one slot for two ranks: ddl launch translates the hostfile, asks
    for oversubscription and, as root, allows it."""
    (tmp_path / "hosts").write_text("localhost:1\n")
    done = run_ddl(["launch", "-n", "2", "--mpiexec", OPENMPI, "--hostfile", tmp_path / "hosts",
                    "--", *train_args(mnist_h5, tmp_path / "c.h5")])
    assert_follows(one_process, done, tmp_path / "c.h5")


@needs_slurm
def test_srun(one_process, mnist_h5, tmp_path):
    done = run(["srun", "--mpi=pmi2", "-w", HOST, "-n", "2", "-t", "5", sys.executable, "-m", "ddl",
                *train_args(mnist_h5, tmp_path / "c.h5")])
    assert_follows(one_process, done, tmp_path / "c.h5")


def wait_for_job(job, timeout=120):
    """The final state of Slurm job `job` (sbatch --wait polls every few seconds; this, 5 times
    a second)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        shown = run(["scontrol", "-o", "show", "job", job]).stdout
        state = shown.split("JobState=", 1)[1].split()[0]
        if state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
            return state
        time.sleep(0.2)
    run(["scancel", job])
    raise TimeoutError(f"job {job} still {state} after {timeout} s")


@needs_slurm
def test_sbatch_job_script(one_process, mnist_h5, tmp_path):
    """scripts/ddl.sbatch as the README submits it, `ddl` on the PATH that sbatch hands on."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    submitted = run(["sbatch", "--parsable", "-w", HOST, "--ntasks", "2", "-t", "5",
                     "-o", tmp_path / "job.out", "-D", ROOT, ROOT / "scripts" / "ddl.sbatch",
                     *train_args(mnist_h5, tmp_path / "c.h5")[1:]], PATH=path)
    assert submitted.returncode == 0, submitted.stderr
    state = wait_for_job(submitted.stdout.strip().split(";")[0])
    assert state == "COMPLETED", (tmp_path / "job.out").read_text()
    assert_follows(one_process, submitted, tmp_path / "c.h5")


@needs_slurm
def test_launch_inside_an_allocation_uses_srun(one_process, mnist_h5, tmp_path):
    done = run(["salloc", "-w", HOST, "-n", "2", "-t", "5", sys.executable, "-m", "ddl", "launch",
                "-n", "2", "--", *train_args(mnist_h5, tmp_path / "c.h5")])
    assert_follows(one_process, done, tmp_path / "c.h5")


def one_error_line(done, *words):
    """Every rank failed; rank 0 alone said why, in one line, and MPICH's stack never showed."""
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, done.stderr
    for word in words:
        assert word in errors[0], errors[0]
    assert "error stack" not in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("env, words", [
    ({"MPI4PY_MPIABI": "openmpi"}, ["MPI4PY_MPIABI=openmpi does not match", "Hydra"]),
    ({"MPI4PY_LIBMPI": "/no/libmpi.so.12"}, ["/no/libmpi.so.12 cannot be loaded"]),
])
def test_wrong_library_under_hydra_is_one_line(env, words, mnist_h5):
    one_error_line(run_mpi(2, ["-m", "ddl", "train", "--data", mnist_h5, *TINY], **env), *words)


@needs_openmpi
def test_mpich_library_under_open_mpi_is_one_line(mnist_h5):
    wheel = Path(sys.prefix, "lib", "libmpi.so.12")     # the mpich wheel's library
    done = openmpi_run("-m", "ddl", "train", "--data", mnist_h5, *TINY, MPI4PY_LIBMPI=wheel)
    one_error_line(done, f"MPI4PY_LIBMPI={wheel}", "Open MPI's mpirun", "unset it")


@needs_slurm
def test_srun_without_pmi_is_one_line(mnist_h5):
    done = run(["srun", "--mpi=none", "-w", HOST, "-n", "2", "-t", "5", sys.executable, "-m",
                "ddl", "train", "--data", mnist_h5, *TINY])
    one_error_line(done, "srun --mpi=pmi2")

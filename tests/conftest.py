"""Shared fixtures: the real MNIST files, one HDF5 file made from them, and an mpiexec runner."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RAW = Path(os.environ.get("DDL_MNIST_RAW", ROOT.parent / "shared" / "data" / "mnist"))


@pytest.fixture(params=["numba", "numpy"])
def backend(request):
    """Run the test once with each kind of kernels (`pytestmark = usefixtures("backend")` runs a
    whole file both ways)."""
    from ddl import kernels
    with kernels.using(request.param):
        yield request.param


@pytest.fixture(scope="session")
def mnist_raw():
    if not (RAW / "train-images-idx3-ubyte.gz").exists():
        pytest.fail(f"MNIST IDX files not found in {RAW} (set DDL_MNIST_RAW)")
    return RAW


@pytest.fixture(scope="session")
def mnist_h5(mnist_raw, tmp_path_factory):
    """data/mnist.h5 as `make data` writes it, made once per test session."""
    from ddl.prepare import prepare_dataset
    out = tmp_path_factory.mktemp("data") / "mnist.h5"
    prepare_dataset(mnist_raw, out, log=lambda _: None)
    return out


def rank_env():
    from ddl.launch import rank_env as env
    return dict(env(), PYTHONPATH=str(ROOT))


def run_mpi(n, args, timeout=120, **kwargs):
    """`mpiexec -n N python ARGS...` with the project's mpiexec; returns the CompletedProcess."""
    from ddl.launch import find_mpiexec
    cmd = [find_mpiexec(), "-n", str(n), sys.executable, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=rank_env(),
                          stdin=subprocess.DEVNULL, **kwargs)


def run_ddl(args, timeout=120, n=None):
    """`ddl ARGS...` in a fresh process, or on N ranks through mpiexec."""
    if n:
        return run_mpi(n, ["-m", "ddl", *args], timeout=timeout)
    return subprocess.run([sys.executable, "-m", "ddl", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=rank_env(), stdin=subprocess.DEVNULL)

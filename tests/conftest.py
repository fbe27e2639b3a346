"""Shared fixtures: the real MNIST files, one HDF5 file made from them, and an mpiexec runner."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RAW = Path(os.environ.get("DDL_MNIST_RAW", ROOT.parent / "shared" / "data" / "mnist"))


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


def run(cmd, timeout=120, **env):
    """CMD (a launcher's, say) in the ranks' environment plus ENV; returns the CompletedProcess."""
    return subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=timeout,
                          env=dict(rank_env(), **env), stdin=subprocess.DEVNULL)


def run_mpi(n, args, timeout=120, **env):
    """`mpiexec -n N python ARGS...` with the project's mpiexec; returns the CompletedProcess."""
    from ddl.launch import find_mpiexec
    return run([find_mpiexec(), "-n", n, sys.executable, *args], timeout, **env)


def run_ddl(args, timeout=120, n=None):
    """`ddl ARGS...` in a fresh process, or on N ranks through mpiexec."""
    if n:
        return run_mpi(n, ["-m", "ddl", *args], timeout=timeout)
    return subprocess.run([sys.executable, "-m", "ddl", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=rank_env(), stdin=subprocess.DEVNULL)

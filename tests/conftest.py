"""Shared fixtures: the real MNIST files, HDF5 files made from them, a synthetic set of colour
images as an .npz and as an image folder, an mpiexec runner, and the checks that a refused command
kept its promise (one line, its status, nothing touched)."""
import contextlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from threadpoolctl import threadpool_limits

# One BLAS thread in the test process and in the runs it starts, as each rank of a job has: on a
# shared 2-core machine a second BLAS thread made single-process steps several times slower.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
threadpool_limits(1)

ROOT = Path(__file__).resolve().parents[1]
RAW = Path(os.environ.get("DDL_MNIST_RAW", ROOT.parent / "shared" / "data" / "mnist"))
MNIST = ((1, 28, 28), 10)          # what build() gets for MNIST: in_shape, num_classes
COLOURS = ["cat", "dog", "frog", "ship"]      # the synthetic set's classes, sorted


# Components that a test may need and CI installs (.ci/run lists them in DDL_REQUIRE): where one
# is missing the test skips with a reason that starts "needs COMPONENT:", and pytest -ra prints
# it; where DDL_REQUIRE names it, that skip is a failure, so that a broken install in CI cannot
# pass as a row of skips.
REQUIRED = set(filter(None, os.environ.get("DDL_REQUIRE", "").split(",")))
_NEEDS = re.compile(r"needs ([\w-]+):")


def needs(component, reason):
    """Skip the calling test, or fixture, saying `reason`: `component` is not here."""
    pytest.skip(f"needs {component}: {reason}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.skipped and isinstance(report.longrepr, tuple):
        found = _NEEDS.search(report.longrepr[2])
        if found and found[1] in REQUIRED:
            report.outcome = "failed"
            report.longrepr = (f"{report.longrepr[2]}; but DDL_REQUIRE={','.join(sorted(REQUIRED))}"
                               f" says this machine has {found[1]}")


def quiet(_):
    pass


def pytest_configure(config):
    """numba set up for ddl's kernels (LLVM's options, the CPU name tuned for this machine, their
    cache) before any test compiles; the tests' subprocesses inherit that CPU name
    ($NUMBA_CPU_NAME, which setup exports) and so never measure it again (docs/tuning.md)."""
    from ddl import kernels
    kernels.setup()


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
    from ddl import sources
    from ddl.prepare import prepare
    out = tmp_path_factory.mktemp("data") / "mnist.h5"
    prepare(sources.idx(mnist_raw, log=quiet), out, log=quiet)
    return out


@pytest.fixture(scope="session")
def small_h5(mnist_h5, tmp_path_factory):
    """The first 512 training and 512 test images of mnist_h5, same schema: for runs that test
    the machinery rather than the learning."""
    out = tmp_path_factory.mktemp("small") / "small.h5"
    with h5py.File(mnist_h5) as src, h5py.File(out, "w") as dst:
        dst.attrs.update(src.attrs)
        for name in ("train/images", "train/labels", "test/images", "test/labels"):
            dst[name] = src[name][:512]
    return out


def colour_images(n, seed):
    """n synthetic 32x32 RGB images (n, 32, 32, 3) uint8, channels-last as Keras keeps them, and
    their labels (n,) sorted by class: class k is a bright 12x12 square, red, green, blue or
    yellow, in quadrant k, on noise. Easy to learn, and nothing like MNIST."""
    rng = np.random.default_rng(seed)
    labels = np.sort(rng.integers(0, len(COLOURS), n))
    images = rng.integers(0, 90, (n, 32, 32, 3), dtype=np.uint8)
    for i, k in enumerate(labels):
        r, c = 16 * (k // 2) + 2, 16 * (k % 2) + 2
        images[i, r:r + 12, c:c + 12, [(0,), (1,), (2,), (0, 1)][k]] = 230
    return images, labels


@pytest.fixture(scope="session")
def colour_npz(tmp_path_factory):
    """colours.npz: 256 training and 128 test images of colour_images, as an .npz of x_train,
    y_train (an (N, 1) column, as Keras's CIFAR), x_test, y_test."""
    out = tmp_path_factory.mktemp("colours") / "colours.npz"
    (x_train, y_train), (x_test, y_test) = colour_images(256, 0), colour_images(128, 1)
    np.savez(out, x_train=x_train, y_train=y_train[:, None], x_test=x_test, y_test=y_test)
    return out


@pytest.fixture(scope="session")
def colour_folder(tmp_path_factory):
    """The images of colour_npz as PNG files in the ImageFolder layout, named by their row, so
    that sorted they come in the .npz's order."""
    from PIL import Image
    root = tmp_path_factory.mktemp("folder") / "colours"
    for split, (images, labels) in (("train", colour_images(256, 0)),
                                    ("test", colour_images(128, 1))):
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = root / split / COLOURS[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i:04d}.png")
    return root


def prepared(source, out):
    """`ddl prepare`'s file for `source` (a ddl.sources.Source) at `out`."""
    from ddl.prepare import prepare
    prepare(source, out, log=quiet)
    return out


@pytest.fixture(scope="session")
def colour_h5(colour_npz):
    from ddl import sources
    return prepared(sources.npz(colour_npz, log=quiet), colour_npz.with_suffix(".h5"))


@pytest.fixture(scope="session")
def colour_folder_h5(colour_folder):
    from ddl import sources
    return prepared(sources.image_folder(colour_folder, log=quiet),
                    colour_folder.with_suffix(".h5"))


def snapshot(folder):
    """{relative path: bytes} of every file under `folder`."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@contextlib.contextmanager
def untouched(folder):
    """Assert that the block leaves every file under `folder` byte-identical, and adds none."""
    before = snapshot(folder)
    yield
    after = snapshot(folder)
    assert sorted(after) == sorted(before), "files came or went"
    assert [k for k in before if after[k] != before[k]] == [], "files changed"


def refused(done, status, *words):
    """`done`, a command's (exit status, output), is a user error as promised: exit `status`, no
    traceback, at most 3 lines of output, the last one `Error: ...` holding each of `words`."""
    code, output = done
    lines = output.strip().splitlines()
    assert code == status, (code, output)
    assert "Traceback" not in output and 1 <= len(lines) <= 3, output
    assert lines[-1].startswith("Error: "), output
    for word in words:
        assert word in lines[-1], lines[-1]


def rank_env():
    from ddl.launch import rank_env as env
    return dict(env(), PYTHONPATH=str(ROOT))


def run(cmd, timeout=120, cwd=None, **env):
    """CMD (a launcher's, say) in folder `cwd` (default: this one), in the ranks' environment plus
    ENV; returns the CompletedProcess."""
    return subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=timeout,
                          env=dict(rank_env(), **env), stdin=subprocess.DEVNULL, cwd=cwd)


def run_mpi(n, args, timeout=120, cwd=None, **env):
    """`mpiexec -n N python ARGS...` with the project's mpiexec, in folder `cwd`; returns the
    CompletedProcess."""
    from ddl.launch import find_mpiexec
    return run([find_mpiexec(), "-n", n, sys.executable, *args], timeout, cwd, **env)


def run_ddl(args, timeout=120, n=None):
    """`ddl ARGS...` in a fresh process, or on N ranks through mpiexec."""
    if n:
        return run_mpi(n, ["-m", "ddl", *args], timeout=timeout)
    return subprocess.run([sys.executable, "-m", "ddl", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=rank_env(), stdin=subprocess.DEVNULL)



def start(args, env=None):
    """`ddl ARGS...` started in the background (in the ranks' environment, or `env`), its errors
    piped."""
    return subprocess.Popen([sys.executable, "-m", "ddl", *map(str, args)],
                            env=env or rank_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc, timeout=60):
    """Until `condition()`, while `proc` runs (its errors shown if it ends first)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def ddl(capfd):
    """`ddl ARGS...` in this process: (exit status, everything it printed)."""
    from ddl import cli

    def call(*args):
        with pytest.raises(SystemExit) as done:
            cli.main([str(a) for a in args])
        out, err = capfd.readouterr()
        return done.value.code, out + err
    return call


def processes(token):
    """{pid: rank, or None for mpiexec and its helpers} of the running processes whose command
    line holds `token` (a test's own folder, say). Hydra puts each rank in a session of its own;
    its rank is in its environment (PMI_RANK)."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            if token not in (entry / "cmdline").read_bytes().decode(errors="replace"):
                continue
            env = (entry / "environ").read_bytes().decode(errors="replace").split("\0")
        except OSError:                       # not a process, or one that just ended
            continue
        ranks = [int(v.split("=", 1)[1]) for v in env if v.startswith("PMI_RANK=")]
        found[int(entry.name)] = ranks[0] if ranks else None
    return found

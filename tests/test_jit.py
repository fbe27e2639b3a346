"""The kernel decorator and its cache (ddl/kernels/jit.py), on tiny kernels of the tests' own:
what `kernel` registers, what `warm` compiles, the cache folder's name and place, and what
`configure` does in a fresh process. None of ddl's own kernels is called (scripts/mutate.py runs
these compiled, where a mutant of jit.py would compile all of them again)."""
import glob
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest

from ddl.kernels import jit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def registry(monkeypatch):
    """An empty list of kernels, none marked ahead, for the test's own kernels."""
    monkeypatch.setattr(jit, "_KERNELS", [])
    monkeypatch.setattr(jit, "_ahead", None)
    return jit._KERNELS


def _cached(name):
    return glob.glob(os.path.join(jit.cache_dir(), "**", f"*{name}*.nbi"), recursive=True)


def test_a_kernel_is_registered_with_its_templates_and_cached(registry):
    for path in _cached("add_one"):
        os.remove(path)

    @jit.kernel("(T[::1], T[::1])")
    def add_one(x, out):
        for i in range(x.shape[0]):
            out[i] = x[i] + 1
    assert registry == [(add_one, ("(T[::1], T[::1])",))]
    x, out = np.arange(3, dtype=np.float64), np.zeros(3)
    add_one(x, out)
    np.testing.assert_array_equal(out, [1, 2, 3])
    assert jit.signature_count() == 1 and _cached("add_one")   # written to ddl's cache folder
    # What makes them fast (module docstring): no bounds checks, and the GIL released, so that
    # the data loader's prefetch thread (ddl/data.py) runs beside them.
    assert add_one.targetoptions["boundscheck"] is False and add_one.targetoptions["nogil"]


def test_kernels_divide_by_zero_as_numpy_does(registry):
    """error_model="numpy": a kernel's 1 / 0 is inf (and 0 / 0 NaN), as in NumPy, not an
    exception raised from inside the loop."""
    @jit.kernel()
    def inverse(x, out):
        for i in range(x.shape[0]):
            out[i] = 1.0 / x[i]
    out = np.zeros(2)
    inverse(np.array([0.0, 2.0]), out)
    np.testing.assert_array_equal(out, [np.inf, 0.5])


def test_warm_compiles_the_kernels_marked_ahead_for_float32(registry):
    @jit.kernel("(T[::1],)", "(T[:, ::1],)")
    def ahead(x):
        x[0] = 1

    jit.mark_ahead()

    @jit.kernel("(T[::1],)")
    def later(x):
        x[0] = 2
    seconds = jit.warm()
    assert isinstance(seconds, float) and 0 <= seconds < 60
    assert [(str(a.dtype), a.ndim) for a, in ahead.signatures] == [("float32", 1),
                                                                   ("float32", 2)]
    assert later.signatures == [] and jit.signature_count() == 2
    jit._ahead = None                               # none marked: every registered kernel
    jit.warm()
    assert len(later.signatures) == 1 and jit.signature_count() == 3


def test_a_call_without_warm_loads_what_warm_stored(registry):
    """numba keys its disk cache by the signature as `compile` is given it: `warm` stores under
    the key that a call compiling lazily looks up (an MPI test job, a user's script). A second
    dispatcher of the same function stands for another process."""
    for path in _cached("stored_by_warm"):
        os.remove(path)

    @jit.kernel("(T[::1],)")
    def stored_by_warm(x):
        x[0] = 3
    jit.warm()
    again = jit.kernel("(T[::1],)")(stored_by_warm.py_func)
    again(np.zeros(2, np.float32))
    stats = again.stats
    assert (sum(stats.cache_hits.values()), sum(stats.cache_misses.values())) == (1, 0)


def test_warm_in_two_processes_compiles_a_share_in_a_forked_helper(registry):
    """`make install` compiles in as many processes as there are cores: a forked helper compiles
    every second factory's kernels into the cache, and warm then loads them from there (a hit,
    no compile), compiling the rest itself. A factory's kernels share numba's index file, so
    they stay in one process (here, closures over 3 and 4)."""
    for name in ("first_share", "helper_share", "factory_share"):
        for path in _cached(name):
            os.remove(path)

    @jit.kernel("(T[::1],)")
    def first_share(x):
        x[0] = 1

    @jit.kernel("(T[::1],)")
    def helper_share(x):
        x[0] = 2

    def factory(k):
        @jit.kernel("(T[::1],)")
        def factory_share(x):
            x[0] = k
        return factory_share
    made = [factory(3), factory(4)]
    assert [[d for d, _ in share] for share in jit._shares(registry, 2)] == [
        [first_share, *made], [helper_share]]
    jit.warm(processes=2)
    loaded = {d.py_func.__qualname__.split(".")[-1] + str(i): (sum(d.stats.cache_hits.values()),
                                                               sum(d.stats.cache_misses.values()))
              for i, d in enumerate([first_share, helper_share, *made])}
    assert loaded == {"first_share0": (0, 1), "helper_share1": (1, 0), "factory_share2": (0, 1),
                      "factory_share3": (0, 1)}
    x = np.zeros(1, np.float32)
    for kernel, value in zip([first_share, helper_share, *made], [1, 2, 3, 4]):
        kernel(x)
        assert x[0] == value


def test_the_version_is_a_hash_of_every_kernel_file(tmp_path, monkeypatch):
    folder = tmp_path / "kernels"
    shutil.copytree(os.path.join(ROOT, "ddl", "kernels"), folder,
                    ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(jit, "_HERE", str(folder))
    version = jit.version.__wrapped__
    first = version()
    assert first == jit.version() and len(first) == 16 and int(first, 16) >= 0
    seen = {first}
    for name in sorted(os.listdir(folder))[:1] + sorted(os.listdir(folder))[-1:]:
        with open(folder / name, "a") as f:
            f.write("# an edit\n")
        seen.add(version())
    (folder / "notes.txt").write_text("not code")
    assert version() in seen and len(seen) == 3     # the first and the last file count


def test_the_cache_folder_is_made_once_and_its_damaged_files_dropped(tmp_path, monkeypatch):
    monkeypatch.setattr(jit, "cache_base", lambda: str(tmp_path))
    monkeypatch.setattr(jit, "_CHECKED", set())
    folder = tmp_path / f"ddl-kernels-{jit.version()}-{jit.target()}"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "cut.nbi").write_bytes(b"")
    assert jit.cache_dir() == str(folder)
    assert os.listdir(folder / "sub") == []
    (folder / "sub" / "cut.nbi").write_bytes(b"")
    assert jit.cache_dir() == str(folder)           # checked once a process
    assert os.listdir(folder / "sub") == ["cut.nbi"]


def test_a_data_file_cut_short_is_found_by_its_frame_at_any_depth(tmp_path):
    """A data file (.nbc, a framed pickle, as numba writes them) cut where a "." happens to end
    it, or a byte short inside, is removed; a whole one is kept, and so is an unframed pickle
    (an older protocol, judged by its STOP alone); under the folder or any folder below it."""
    data = pickle.dumps(("library", b"." * 1000), protocol=5)
    files = {"whole.1.nbc": data, "cut.1.nbc": data[:500], "short.1.nbc": data[:-2] + data[-1:],
             "old.1.nbc": pickle.dumps("a", protocol=2)}
    for sub in ("", "a", os.path.join("a", "b")):
        os.makedirs(tmp_path / sub, exist_ok=True)
        for name, content in files.items():
            (tmp_path / sub / name).write_bytes(content)
    removed = jit._drop_damaged(str(tmp_path))
    assert sorted(os.path.relpath(p, tmp_path) for p in removed) == sorted(
        os.path.join(sub, name) for sub in ("", "a", os.path.join("a", "b"))
        for name in ("cut.1.nbc", "short.1.nbc"))


def test_the_cache_bases_in_order(tmp_path, monkeypatch):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "numba"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setattr("tempfile.tempdir", None)
    (tmp_path / "tmp").mkdir()
    here = os.path.join(jit._HERE, "__pycache__")
    tmp = str(tmp_path / "tmp" / f"ddl-{os.getuid()}")
    assert jit._bases() == [str(tmp_path / "numba"), here, str(tmp_path / "xdg" / "ddl"), tmp]
    monkeypatch.delenv("NUMBA_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert jit._bases() == [here, str(tmp_path / "home" / ".cache" / "ddl"), tmp]


def test_the_cache_base_is_the_first_writable_and_old_versions_go(tmp_path, monkeypatch):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    base = tmp_path / "base"
    bases = [str(blocked / "below"), str(base), str(tmp_path / "unused")]
    monkeypatch.setattr(jit, "_bases", lambda: bases)
    mine = [f"ddl-kernels-{jit.version()}-haswell", f"ddl-kernels-{jit.version()}.tune.json"]
    old = ["ddl-kernels-0123456789abcdef-haswell", "ddl-kernels-0123456789abcdef.tune.json",
           "ddl-kernels-fedcba9876543210-znver4"]
    base.mkdir()
    for name in (old[0], mine[0], old[2]):      # the current one between two old ones
        (base / name).mkdir()
    for name in (mine[1], old[1], "other.json"):
        (base / name).write_text("{}")
    assert jit.cache_base.__wrapped__() == str(base)
    assert sorted(os.listdir(base)) == sorted(mine + ["other.json"])
    assert not os.path.exists(tmp_path / "unused")
    bases[1] = str(blocked / "also-below")
    assert jit.cache_base.__wrapped__() == str(tmp_path / "unused")
    bases.pop()
    with pytest.raises(RuntimeError, match="set NUMBA_CACHE_DIR"):
        jit.cache_base.__wrapped__()


def test_the_choice_files_are_beside_the_cache_then_in_every_other_base(tmp_path, monkeypatch):
    bases = [str(tmp_path / b) for b in "abc"]
    monkeypatch.setattr(jit, "_bases", lambda: bases)
    monkeypatch.setattr(jit, "cache_base", lambda: bases[1])
    name = f"ddl-kernels-{jit.version()}"
    assert jit.choice_files() == [os.path.join(b, name + ".tune.json") for b in
                                  (bases[1], bases[0], bases[2])]
    assert jit.choice_files("convs")[0] == os.path.join(bases[1], name + ".convs.json")


# A fresh process: a kernel made before configure() (not yet cached) and one made after it are
# both cached in the cache folder once configure() has run, which also exports the CPU name.
CONFIGURE = """
import glob, os, sys
import numba, numpy as np
from ddl.kernels import jit

@jit.kernel()
def before_configure(x):
    x[0] = 1
before = numba.config.CACHE_DIR
jit.configure()
jit.configure()

@jit.kernel()
def after_configure(x):
    x[0] = 2
x = np.zeros(1)
before_configure(x)
after_configure(x)
folder = jit.cache_dir()
cached = sorted(os.path.basename(p).split(".")[1].split("-")[0]
                for p in glob.glob(os.path.join(folder, "**", "*.nbi"), recursive=True))
print(before == numba.config.CACHE_DIR, os.environ["NUMBA_CPU_NAME"], numba.config.CPU_NAME,
      os.path.dirname(folder) == sys.argv[1], cached)
"""


def test_configure_caches_every_kernel_and_exports_the_cpu_name(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), NUMBA_CPU_NAME="haswell")
    (tmp_path / "probe.py").write_text(CONFIGURE)     # numba caches only what is in a file
    out = subprocess.run([sys.executable, str(tmp_path / "probe.py"), str(tmp_path)], env=env,
                         cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split(None, 4) == ["True", "haswell", "haswell", "True",
                                         "['after_configure', 'before_configure']\n"]


def test_interleaving_is_forced_for_x86_without_avx512_only(monkeypatch):
    """Two vectors a turn where the feature list (given, else the host's) has no AVX-512."""
    monkeypatch.setattr(jit.platform, "machine", lambda: "x86_64")
    monkeypatch.setenv("NUMBA_CPU_FEATURES", "")                # a CPU name's own: haswell's
    assert jit.llvm_options() == jit.LLVM_OPTIONS + jit.NARROW_VECTOR_OPTIONS
    monkeypatch.setenv("NUMBA_CPU_FEATURES", "+avx2,+fma,-avx512f")
    assert jit.llvm_options() == jit.LLVM_OPTIONS + jit.NARROW_VECTOR_OPTIONS
    monkeypatch.setenv("NUMBA_CPU_FEATURES", "+avx2,+fma,+avx512f")
    assert jit.llvm_options() == jit.LLVM_OPTIONS
    monkeypatch.delenv("NUMBA_CPU_FEATURES")
    monkeypatch.setattr(jit.llvm, "get_host_cpu_features", lambda: _Features("+sse2,+avx512f"))
    assert jit.llvm_options() == jit.LLVM_OPTIONS
    monkeypatch.setattr(jit.llvm, "get_host_cpu_features", lambda: _Features("+sse2,+avx2"))
    assert jit.llvm_options() == jit.LLVM_OPTIONS + jit.NARROW_VECTOR_OPTIONS
    monkeypatch.setattr(jit.platform, "machine", lambda: "aarch64")
    assert jit.llvm_options() == jit.LLVM_OPTIONS


class _Features:
    def __init__(self, text):
        self.text = text

    def flatten(self):
        return self.text


def test_importing_the_compiled_backend_sets_numba_up():
    """`from ddl.kernels import numba` without kernels.get first: the kernels must still compile
    for the tuned CPU name, with ddl's LLVM options and cache (unconfigured, they ran ten times
    slower). configure() exports the name it compiles for, as the tests' own set-up did here."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CPU_NAME"}
    code = ("import os\nfrom ddl.kernels import numba, jit\n"
            "print(os.environ.get('NUMBA_CPU_NAME'), jit.cache_dir() in "
            "str(numba.norm.batch_normalize._cache._cache_path))")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.split()
    assert out == [jit.target(), "True"]

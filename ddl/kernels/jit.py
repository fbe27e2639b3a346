"""numba as ddl uses it: one decorator for every compiled kernel, its on-disk cache, and `warm`.

Kernels are plain loops over NumPy arrays, compiled on first use and cached on disk. numba checks
a cached kernel only against its own file, so a change to a helper or an option in another file
would go unseen: ddl's kernels therefore cache in a folder named after a hash of every file in
ddl/kernels/ and the CPU name compiled for (`target()`, measured per CPU model by tune.py), beside
the code when that is writable, else in the user's cache folder, else in a temporary one (a
read-only install still works). Each kernel names the float32 signatures that
training uses, so `warm()` (run by `make install`, and rank 0 first at the start of training) can
compile or load them all before the first step instead of in the middle of it.

Importing this module changes nothing outside it: `configure()` (which `ddl.kernels.setup()`
calls, and choosing or importing the numba backend too) sets LLVM's options, the CPU name and the
cache folder, before the first compile.

Writing a kernel that vectorises: the innermost loop runs over unit-stride memory and indexes it
with its own loop variable. numba wraps negative indices around, and an index that LLVM cannot
prove non-negative (`x[i + j * n]` with n an argument) costs a check per element that turns
vector loads into gathers, several times slower; slice first (`xs = x[j * n:]`, then `xs[i]`).
"""
import contextlib
import functools
import glob
import hashlib
import os
import pickle
import pickletools
import platform
import shutil
import struct
import tempfile
import time

import llvmlite.binding as llvm
import numba
from numba.core import sigutils

from ddl.errors import KernelCacheError
from ddl.kernels import tune

# Fast-math minus the "no NaN / no inf" promises: a NaN must survive a ReLU or a max so that a
# diverging run is seen, not hidden. `reassoc` lets LLVM vectorise sums; `contract` allows FMAs.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
LLVM_OPTIONS = (
    # The Winograd transforms read and write 16 arrays in one loop. LLVM then needs more run-time
    # overlap checks than its default limit of 128 before it vectorises the loop, and without them
    # ref-cnn's input transform ran an order of magnitude slower.
    "-vectorize-memory-check-threshold=1000",
    # A direct convolution unrolls its C*kh*kw taps (up to 32, times the four outputs of a pooling
    # window) inside the vectorised loop over the batch; LLVM's default size limit left
    # seed-cnn's 5x5 taps rolled up, and the loop scalar: an order of magnitude slower.
    "-unroll-threshold=2000",
)

# x86 without AVX-512 (16 vector registers of 8 floats): LLVM vectorised the direct convolution's
# loop one vector at a time, each of its 36 weights broadcast from memory for a single
# multiply-add, and the loads, not the multiplications, set the pace; two vectors a turn use each
# broadcast twice. Held to AVX2 on the model 167 Xeon, training ran 7-16% faster (docs/speed.md);
# with AVX-512, whose 32 registers hold the weights, no faster.
NARROW_VECTOR_OPTIONS = ("-force-vector-interleave=2",)

_HERE = os.path.dirname(os.path.abspath(__file__))
_KERNELS = []   # (dispatcher, signature templates)
_ahead = None   # how many of _KERNELS `warm` compiles (None: all); see `mark_ahead`
_configured = False


def configure():
    """Set LLVM's options and the CPU to compile for (`target()`), and give every kernel,
    registered or still to come, its on-disk cache. Call it before the first compile (LLVM reads
    its options then, numba the CPU name); calling it again does nothing."""
    global _configured
    if _configured:
        return
    for option in llvm_options():
        llvm.set_option("", option)
    # numba reads its NUMBA_ variables again whenever one of them changes, and would forget a
    # name set in numba.config alone; the ranks and tools that this process starts inherit it.
    numba.config.CPU_NAME = os.environ[tune.EXPLICIT] = target()
    _configured = True
    for dispatcher, _ in _KERNELS:
        _cache(dispatcher)


@functools.lru_cache(maxsize=None)
def target():
    """The LLVM CPU name that the kernels compile for: $NUMBA_CPU_NAME if set, else the fastest
    measured on this CPU model for this version of the kernels (ddl/kernels/tune.py)."""
    return tune.target(choice_files(), version())


def llvm_options():
    """The LLVM options that `configure` sets: LLVM_OPTIONS, and NARROW_VECTOR_OPTIONS where the
    kernels compile for x86-64 without AVX-512."""
    return LLVM_OPTIONS + (() if wide_vectors() else NARROW_VECTOR_OPTIONS)


def wide_vectors():
    """Whether the kernels compile for AVX-512 (the feature list numba passes: $NUMBA_CPU_FEATURES
    where set, else the host's), or for a CPU other than x86-64, whose options stay LLVM's."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    features = os.environ.get("NUMBA_CPU_FEATURES")
    if features is None:
        features = llvm.get_host_cpu_features().flatten()
    return "+avx512f" in features.split(",")


def code_name(name=None):
    """What the kernels compile for, as their cache folder and the convolutions' plan name it:
    the CPU name (`name`, default `target()`), with a hash of $NUMBA_CPU_FEATURES where that
    replaces the host's instruction sets (an AVX2 build on an AVX-512 CPU is other code, with
    other speeds: its plan is its own)."""
    name = name or target()
    features = os.environ.get("NUMBA_CPU_FEATURES")
    if features is None:
        return name
    return f"{name}-features-{hashlib.sha256(features.encode()).hexdigest()[:8]}"


def choice_files(kind="tune"):
    """Where a measured choice is looked for, the first where it is written: beside the cache
    (`cache_base()`), then in the other cache bases (a choice holds for every cache folder).
    `kind`: "tune" for the CPU name (tune.py), "convs" for the convolutions' (convplan.py)."""
    name = f"ddl-kernels-{version()}.{kind}.json"
    first = cache_base()
    return [os.path.join(base, name) for base in [first] + [b for b in _bases() if b != first]]


def _cache(dispatcher):
    previous = numba.config.CACHE_DIR
    numba.config.CACHE_DIR = cache_dir()    # read as the cache is set up, then restored
    try:
        dispatcher.enable_caching()         # what numba.njit(cache=True) does
    finally:
        numba.config.CACHE_DIR = previous


def helper(fn):
    """A small function that kernels call. numba inlines it into each caller: compiled apart,
    LLVM treated some callers' inner loops as optimised for size and left them scalar."""
    return numba.njit(fastmath=FASTMATH, error_model="numpy", inline="always")(fn)


# C-contiguous arrays of the float type in signature templates, by number of dimensions.
FLAT, X3, X4 = "T[::1]", "T[:, :, ::1]", "T[:, :, :, ::1]"


def kernel(*signatures):
    """Compile a function with numba, cached; `signatures` are templates in which "T" stands for
    the float type, e.g. "(T[:, ::1], T[::1], float64)", compiled ahead for float32 by `warm`.
    Other argument types (float64 in the gradient checks) compile on first call. The kernel
    caches on disk once `configure()` has run."""
    def decorate(fn):
        if numba.config.DISABLE_JIT:
            return fn   # NUMBA_DISABLE_JIT=1: the kernel runs as Python (docs/mutation.md)
        dispatcher = numba.njit(fastmath=FASTMATH, error_model="numpy", boundscheck=False,
                                nogil=True)(fn)
        _KERNELS.append((dispatcher, signatures))
        if _configured:
            _cache(dispatcher)
        return dispatcher
    return decorate


def cache_dir():
    """The folder of numba's cache: ddl-kernels-<version()>-<code_name()> in `cache_base()`, so
    that neither another version of the kernels nor code for another CPU name (or instruction
    sets) is ever loaded."""
    folder = os.path.join(cache_base(), f"ddl-kernels-{version()}-{code_name()}")
    os.makedirs(folder, exist_ok=True)
    if folder not in _CHECKED:              # once a process: a full disk's leftovers go
        _CHECKED.add(folder)
        _drop_damaged(folder)
    return folder


_CHECKED = set()


@functools.lru_cache(maxsize=None)
def version():
    """A hash of every file in ddl/kernels/: the version that the cache and the tuning hold for."""
    digest = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(_HERE, "*.py"))):
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def _bases():
    user_cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"),
                                                                  ".cache")
    return [b for b in (os.environ.get("NUMBA_CACHE_DIR"), os.path.join(_HERE, "__pycache__"),
                        os.path.join(user_cache, "ddl"),
                        os.path.join(tempfile.gettempdir(), f"ddl-{os.getuid()}")) if b]


@functools.lru_cache(maxsize=None)
def cache_base():
    """The first writable of: $NUMBA_CACHE_DIR, ddl/kernels/__pycache__, ~/.cache/ddl and the
    temporary folder. What older versions of the kernels left there is removed."""
    for base in _bases():
        try:
            os.makedirs(base, exist_ok=True)
            tempfile.TemporaryFile(dir=base).close()
        except OSError:
            continue
        for old in glob.glob(os.path.join(base, "ddl-kernels-*")):
            if os.path.basename(old).startswith(f"ddl-kernels-{version()}"):
                continue
            shutil.rmtree(old, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.remove(old)                      # an old tuning file: not a folder
        return base
    raise RuntimeError("no writable folder for numba's cache: set NUMBA_CACHE_DIR")


def _drop_damaged(folder):
    """Remove the cache files under `folder` that a full disk or a crash cut short, so that
    numba compiles those kernels again instead of failing on them in every run (its loader
    unpickles them unchecked). Returns the paths removed."""
    removed = []
    for path in sorted(glob.glob(os.path.join(folder, "**", "*.nb[ic]"), recursive=True)):
        try:
            intact = _intact(path)
        except (ValueError, EOFError, OSError, struct.error):
            intact = False
        if not intact:
            with contextlib.suppress(OSError):
                os.remove(path)
                removed.append(path)
    return removed


def _intact(path):
    """Whether cache file `path` looks whole, checked without running any of its pickles: an
    index (.nbi, small: two pickles) by walking their opcodes; a data file (.nbc, mostly machine
    code, walked in 6x the time) by its first frame fitting in the file and its last byte being
    pickle's STOP. A cut that passes this (about one in 256) is what `warm` reports."""
    with open(path, "rb") as f:
        if path.endswith(".nbi"):
            for _ in range(2):
                for _ in pickletools.genops(f):
                    pass
            return True
        head, size = f.read(11), os.fstat(f.fileno()).st_size
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
    frame = int.from_bytes(head[3:11], "little") if head[2:3] == b"\x95" else 0
    return last == b"." and size >= 11 + frame


def mark_ahead():
    """Make the kernels registered so far the ones that `warm` compiles (the numba backend calls
    it once its modules, and their kernel factories' common sizes, are imported). A factory's
    kernel for another size, made later, compiles on its first call: in a process that made
    many (the test suite's odd shapes), `warm` compiled every one of them again for float32."""
    global _ahead
    _ahead = len(_KERNELS)


def warm(processes=1):
    """Compile or load every kernel marked ahead (every registered one if none is marked) for
    float32; returns the seconds it took. With processes > 1 (`make install`: `cores()`) forked
    helpers first compile shares of them into the cache, from which this process then loads
    theirs: numba compiles a kernel on one core."""
    configure()
    started = time.perf_counter()
    todo = _KERNELS[:_ahead]
    if processes > 1 and todo and hasattr(os, "fork"):
        _compile_in_helpers(todo, processes)
    _compile(todo)
    return time.perf_counter() - started


def cores():
    """How many cores this process may run on, for `warm`'s processes: its affinity, or 1 where
    the OS keeps no affinity (macOS, where a forked helper is not safe with every library)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1


def _compile(kernels):
    """Compile (or load) each (dispatcher, signature templates) of `kernels` for float32."""
    for dispatcher, signatures in kernels:
        for template in signatures:
            # numba keys its on-disk cache by the signature as `compile` is given it, and a call
            # compiles under the tuple of its argument types: given the string, `warm` stored
            # every kernel under a key that no call looks up (the first process that called a
            # kernel without `warm`, an MPI test job, compiled it all again, 5-10 s a rank).
            args, _ = sigutils.normalize_signature(template.replace("T", "float32"))
            try:
                dispatcher.compile(tuple(args))
            except (pickle.UnpicklingError, EOFError) as e:
                raise KernelCacheError(f"numba's kernel cache {cache_dir()} is damaged ({e}): "
                                       f"remove that folder, and ddl compiles it again") from None


def _compile_in_helpers(todo, processes):
    """Compile the kernels of `todo` into the cache, `_shares`' first in this process and each
    other in a forked helper. A helper that fails costs nothing but time: `warm` then compiles
    its share itself."""
    shares = _shares(todo, processes)
    helpers = []
    for share in shares[1:]:
        pid = os.fork()
        if pid == 0:                # the helper: its share, then out without the parent's exits
            code = 1
            try:
                _compile(share)
                code = 0
            finally:
                os._exit(code)
        helpers.append(pid)
    try:
        _compile(shares[0])
    finally:
        for pid in helpers:
            os.waitpid(pid, 0)


def _shares(todo, processes):
    """`todo` split into `processes` lists, factory by factory in turn: the kernels of one factory
    (one qualified name) stay together, since numba keeps their cache entries in one index file,
    which two writers would race on (the last to save would drop the other's entry)."""
    groups = {}
    for dispatcher, signatures in todo:
        fn = dispatcher.py_func
        groups.setdefault((fn.__module__, fn.__qualname__), []).append((dispatcher, signatures))
    groups = list(groups.values())
    return [[k for group in groups[i::processes] for k in group] for i in range(processes)]


def signature_count():
    """How many specialisations the kernels hold (a test checks that training adds none after
    `warm`, i.e. that the declared signatures are the ones really used)."""
    return sum(len(d.signatures) for d, _ in _KERNELS)

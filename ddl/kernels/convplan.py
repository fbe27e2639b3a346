"""Per-layer code selection by measurement: which algorithm each convolution of a model runs.

The numba backend has several algorithms for a convolution (ddl/kernels/numba.py's _ALGORITHMS:
one GEMM on an im2col panel, the direct kernel, Winograd F(2x2, 3x3), ...), and which is fastest
depends on the layer's shape, the batch, the CPU and even the machine's load, more than a fixed
rule can say. So, as FFTW plans a transform and oneDNN dispatches a primitive, the layers' shapes
are timed once on each candidate that fits them, and the fastest kept:

- `record(rehearse)`: the convolutions (`Conv`: every argument their speed depends on) that one
  forward and backward of the model runs.
- `decide(convs, candidates, trial)`: for each, every candidate's forward + backward timed on
  random data in interleaved rounds (the machine's noise hits all alike), the lowest median kept.
- `measure(...)`: the two, with the choices stored beside numba's cache, keyed like the kernel
  tuning (ddl/kernels/tune.py) by CPU model, CPU name compiled for and kernel version, so a
  shape is timed once per machine model and version; `python -m ddl.kernels --show` prints them,
  `--retune` forgets them.
- `adopt(plan)`: what conv2d_forward then runs (`chosen(conv)`), rank 0's plan on every rank.

$DDL_CONV_ALGORITHM=name (`forced()`) runs that algorithm wherever it fits, whatever the plan;
a shape that no plan holds (a plain call outside training, an evaluation batch of another size)
runs numba.algorithm's fixed rule. docs/tuning.md has the details.
"""
import os
import time
from typing import NamedTuple

from threadpoolctl import threadpool_info

from ddl.errors import UsageError
from ddl.kernels import jit, tune

FORCE = "DDL_CONV_ALGORITHM"
# Interleaved timings per candidate: the median of 5 stands up to two of a loaded machine's
# outliers, and resnet-mini's 8 shapes took 2-3 s to time on a 2-core machine under load 6 (one
# BLAS thread; docs/tuning.md). A candidate 1.5x behind after 2 rounds is not timed further.
ROUNDS = 5
PRUNE_AFTER, PRUNE = 2, 1.5


class Conv(NamedTuple):
    """A convolution as it is planned: weight (O, C, kh, kw), stride, padding, input x (N, C, H,
    W), dtype name, and whether a 2x2 max pool (and ReLU) is fused into it."""
    weight: tuple
    stride: tuple
    padding: tuple
    x: tuple
    dtype: str
    pool: bool = False
    relu: bool = False

    def __str__(self):
        def dims(t):
            return "x".join(map(str, t))
        return (f"w {dims(self.weight)} stride {dims(self.stride)} pad {dims(self.padding)} "
                f"x {dims(self.x)} {self.dtype}" + " +pool" * self.pool + " +relu" * self.relu)


_chosen = {}        # Conv -> algorithm name: the adopted plan
_recorded = None    # Conv -> whether its input gradient was asked for, while `record` runs


def forced(names):
    """$DDL_CONV_ALGORITHM (one of `names`), or None when unset."""
    name = os.environ.get(FORCE, "")
    if name and name not in names:
        raise UsageError(f"${FORCE}={name!r} is not a convolution algorithm (choose from "
                         f"{', '.join(names)})")
    return name or None


def chosen(conv):
    """The algorithm that the adopted plan gives `conv`, or None."""
    return _chosen.get(conv)


def adopt(plan):
    """Run the algorithms of `plan` ({Conv: name}) from now on, in place of any earlier plan."""
    _chosen.clear()
    _chosen.update(plan)


def note(conv, input_grad=False):
    """conv2d_forward's and conv2d_backward's report of a convolution they ran (kept while
    `record` runs)."""
    if _recorded is not None:
        _recorded[conv] = _recorded.get(conv, False) or input_grad


def record(rehearse):
    """{Conv: input gradient asked} of the convolutions that `rehearse()` runs."""
    global _recorded
    _recorded = {}
    try:
        rehearse()
        return _recorded
    finally:
        _recorded = None


def decide(convs, candidates, trial, clock=time.perf_counter, rounds=ROUNDS):
    """{Conv: (fastest name, {name: median seconds})} for `convs` ({Conv: input_grad}).
    `candidates(conv)` lists the algorithms that fit (one alone is taken untimed); `trial(conv,
    input_grad)` returns run(name), one forward and backward of conv by that algorithm, which is
    run once untimed (compiling, allocating), then timed `rounds` times, the candidates taking
    turns; after PRUNE_AFTER rounds, those whose best time is over PRUNE times the best are
    dropped (timing a candidate that is far behind would double a plan's cost). A tie keeps
    the earlier candidate."""
    out = {}
    for conv, input_grad in convs.items():
        names = candidates(conv)
        if len(names) == 1:
            out[conv] = (names[0], {})
            continue
        run = trial(conv, input_grad)
        for name in names:
            run(name)
        times = {name: [] for name in names}
        for i in range(rounds):
            if i == PRUNE_AFTER:
                best = min(min(t) for t in times.values())
                names = [name for name in names if min(times[name]) <= PRUNE * best]
            for name in names:
                start = clock()
                run(name)
                times[name].append(clock() - start)
        medians = {name: sorted(t)[(len(t) - 1) // 2] for name, t in times.items()}
        out[conv] = (min(names, key=medians.get), medians)
    return out


def measure(rehearse, candidates, trial, log=None, clock=time.perf_counter):
    """The plan ({Conv: name}) for the convolutions that `rehearse()` runs: each one's stored
    choice, else `decide`'s (timed with `clock`), stored for next time (a lock keeps two
    processes of one machine from timing at once). Returns (plan, how many shapes were timed
    now)."""
    log = log or tune.stderr
    convs = record(rehearse)
    paths, key = _where()
    with tune.locked(paths[0] + ".lock"):
        entries = stored(log)[2]
        todo = {c: g for c, g in convs.items() if _name(c, g) not in entries}
        if todo:
            log(f"ddl: timing the convolution algorithms for {len(todo)} layer shape(s) (once "
                f"per CPU model and ddl version; docs/tuning.md)")
            for conv, (name, medians) in decide(todo, candidates, trial, clock).items():
                entries[_name(conv, todo[conv])] = dict(
                    algorithm=name, ms={k: round(s * 1e3, 4) for k, s in medians.items()})
            tune.store(paths[0], jit.version(), key, entries, log, "the convolution plan",
                       "timed")
    return {c: entries[_name(c, g)]["algorithm"] for c, g in convs.items()}, len(todo)


def _name(conv, input_grad):
    return str(conv) + ("" if input_grad else " -input grad")


def stored(log=None, target=None):
    """(path, key, {shape name: entry}) of the choices stored for this CPU model, CPU name
    (default: the one compiled for) and kernel version (path None where there are none); a
    damaged file is said in one line to `log`."""
    paths, key = _where(target)
    for path in paths:
        entries = (tune.read(path, jit.version(), log or (lambda _: None)) or {}).get(key)
        if isinstance(entries, dict) and entries:
            return path, key, {k: v for k, v in entries.items()
                               if isinstance(v, dict) and isinstance(v.get("algorithm"), str)}
    return None, key, {}


def forget():
    """Remove the choices stored for this CPU model (whatever the CPU name and threads) from
    every file; returns how many keys held some."""
    prefix, removed = tune.cpu_key() + " for ", 0
    for path in jit.choice_files("convs"):
        table = tune.read(path, jit.version(), lambda _: None) or {}
        mine = [key for key in table if key.startswith(prefix)]
        for key in mine:
            del table[key]
        if mine:
            tune.write(path, jit.version(), table)
            removed += len(mine)
    return removed


def _where(target=None):
    """The files the choices are looked for in (the first the one written) and their key: the
    CPU model, the CPU name and instruction sets the kernels are compiled for (`jit.code_name`:
    other code, other speeds) and the number of BLAS threads (GEMMs on two threads of a busy
    machine can be many times slower than on one)."""
    threads = max((pool["num_threads"] for pool in threadpool_info()
                   if pool.get("user_api") == "blas"), default=1)
    return (jit.choice_files("convs"),
            f"{tune.cpu_key()} for {jit.code_name(target)}, {threads} BLAS thread(s)")


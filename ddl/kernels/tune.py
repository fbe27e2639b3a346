"""Per-CPU code selection by measurement: the LLVM target CPU that numba compiles ddl's kernels for.

numba compiles for the host's own CPU name by default, and LLVM's tuning for that name (its cost
model, scheduling, preferred vector width) is not always the fastest for ddl's loops: on Intel
AVX-512 Xeons the kernels ran 40-55% slower than compiled for "haswell" or "znver4". numba
passes the host's own feature list explicitly (every instruction set extension on or off), so any
CPU name generates only instructions this CPU has: the name changes the tuning, never
correctness. Like FFTW's plans, the choice is measured once, then remembered:

- `target(...)`: the CPU name to compile for. An explicit $NUMBA_CPU_NAME wins; else the choice
  stored for this CPU model (`cpu_key()`) and kernel version in the choice file; else a fresh
  measurement (`measure`), stored. Processes that start together (the ranks of a run) wait for
  one another on a lock beside the file, so one measures and all use its choice.
- `measure(names)`: one child process per candidate (`python -m ddl.tuning`, compiling with that
  CPU name into its own cache folder), each timing the training steps of ref-cnn, seed-cnn and
  resnet-mini; the children take turns, round after round, so the machine's noise hits all
  alike.

A damaged or unreadable choice file costs one line on stderr and a new measurement, never an
error. `python -m ddl.kernels --show` prints the choice, `--retune` measures again
(docs/tuning.md).
"""
import contextlib
import fcntl
import functools
import hashlib
import json
import os
import platform
import subprocess
import sys
import time

import llvmlite.binding as llvm

EXPLICIT = "NUMBA_CPU_NAME"
# Tried after the host's own name on x86-64, in this order (two more processes to compile and
# time, which is what a fresh install can afford): one AVX2-era Intel tuning, one AVX-512 AMD.
X86_CANDIDATES = ("haswell", "znver4")
# The host's own name is replaced only by one at least this much faster: noise alone should not
# switch.
MARGIN = 0.03
ROUNDS = 7


def cpu_key():
    """This CPU's model, as the choice is stored under: vendor, family, model and model name from
    /proc/cpuinfo, a hash of its flags, and the name LLVM gives it."""
    fields, flags = {}, ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break                    # the first processor's block is enough
                k, _, v = line.partition(":")
                fields[k.strip()] = v.strip()
        flags = fields.get("flags", fields.get("Features", ""))
    digest = hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:12]
    model = "/".join(fields.get(k, "?") for k in ("vendor_id", "cpu family", "model"))
    name = fields.get("model name") or platform.processor() or platform.machine()
    return f"{llvm.get_host_cpu_name()} {model} {name} flags:{digest}"


def candidates():
    """The CPU names to time: the host's own first (the default, kept on a tie)."""
    host = llvm.get_host_cpu_name()
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return [host]
    return [host] + [name for name in X86_CANDIDATES if name != host]


def target(paths, version, key=None, measure_fn=None, log=None):
    """The CPU name to compile for: $NUMBA_CPU_NAME if set, else the choice stored for `key`
    (default `cpu_key()`) and `version` in the first of `paths` (choice files, the first the one
    to write) that has it, else a new measurement by `measure_fn(candidates())` (default
    `measure`), stored in paths[0]."""
    if os.environ.get(EXPLICIT):
        return os.environ[EXPLICIT]
    return choice(paths, version, key, measure_fn, log)["target"]


def choice(paths, version, key=None, measure_fn=None, log=None):
    """The stored choice for this CPU and version (a dict: target, measured, ...), measured now
    if there is none; see `target`."""
    key = key or cpu_key()
    log = log or stderr
    found = _stored(paths, version, key, log)
    if found is not None:
        return found
    with locked(paths[0] + ".lock"):
        found = _stored(paths[:1], version, key, lambda _: None)    # another process's, meanwhile
        if found is not None:
            return found
        log("ddl: measuring which CPU tuning makes the kernels fastest on this machine (once "
            "per CPU model and ddl version; docs/tuning.md)")
        found = decide(measure_fn or measure, log)
        store(paths[0], version, key, found, log)
    return found


def decide(measure_fn, log):
    """The choice from `measure_fn(candidates())` -> {name: {model: seconds per image}}: the
    name with the lowest geometric mean over the models, the host's unless another beats it by
    MARGIN. A failed measurement keeps the host's name, with its reason."""
    names = candidates()
    try:
        measured = measure_fn(names)
    except (OSError, RuntimeError, ValueError) as e:
        log(f"ddl: kernel tuning failed ({e}); compiling for this CPU's own name, {names[0]}")
        return dict(target=names[0], error=str(e), when=_now())
    score = {name: _geomean(times.values()) for name, times in measured.items()}
    best = min(score, key=score.get)
    if best != names[0] and score[best] * (1 + MARGIN) > score.get(names[0], float("inf")):
        best = names[0]
    return dict(target=best, measured=measured, when=_now())


def forget(paths, version, key=None):
    """Remove the choice stored for this CPU and version from every file in `paths` (the next
    `target` measures again); returns how many files held one."""
    key, removed = key or cpu_key(), 0
    for path in paths:
        table = read(path, version, lambda _: None)
        if table and table.pop(key, None) is not None:
            write(path, version, table)
            removed += 1
    return removed


def stored(paths, version, key=None, log=None):
    """(path, choice) of the choice stored for this CPU and version, or (None, None); a damaged
    file is said in one line to `log`."""
    key = key or cpu_key()
    for path in paths:
        found = (read(path, version, log or (lambda _: None)) or {}).get(key)
        if _valid(found):
            return path, found
    return None, None


def _stored(paths, version, key, log):
    for path in paths:
        table = read(path, version, log)
        if table is not None and _valid(table.get(key)):
            return table[key]
    return None


def _valid(entry):
    return isinstance(entry, dict) and isinstance(entry.get("target"), str) and entry["target"]


def read(path, version, log):
    """{cpu key: choice} from the file at `path` for `version`, or None: missing, of another
    version, or damaged (said in one line)."""
    try:
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict) or not isinstance(data.get("cpus"), dict):
            raise ValueError("not a ddl kernel tuning file")
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:              # JSONDecodeError and UnicodeDecodeError too
        log(f"ddl: ignoring the kernel tuning file {path} ({type(e).__name__}: {e})")
        return None
    return data["cpus"] if data.get("version") == version else None


def store(path, version, key, entry, log, what="the kernel tuning", again="measured"):
    """`entry` under `key` in the file at `path` for `version`; a failure to write is said in one
    line to `log` (`what` could not be stored, and is `again` next time)."""
    table = read(path, version, lambda _: None) or {}
    table[key] = entry
    try:
        write(path, version, table)
    except OSError as e:
        log(f"ddl: cannot store {what} in {path} ({e}); it is {again} again next time")


def write(path, version, table):
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(dict(version=version, cpus=table), f, indent=1, sort_keys=True)
    os.replace(tmp, path)


@contextlib.contextmanager
def locked(path):
    """An exclusive lock on the file at `path` (created if need be); none where it cannot be."""
    try:
        f = open(path, "a")
    except OSError:
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def measure(names, rounds=ROUNDS, extra=None):
    """{name: {model: seconds per image}}: medians over `rounds` turns of a child process per
    CPU name (all started at once, so they compile together, then timed one at a time). `extra`,
    {name: function returning the same kind of dict}, adds contestants timed in this process in
    the same turns (a benchmark's)."""
    env = {k: v for k, v in os.environ.items() if k != EXPLICIT}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    children = {name: subprocess.Popen([sys.executable, "-m", "ddl.tuning"],
                                       env=dict(env, **{EXPLICIT: name}), text=True,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                for name in names}
    try:
        for name, child in children.items():
            _answer(name, child)                     # "ready": compiled and warmed up
        turns = {name: functools.partial(_turn, name, child) for name, child in children.items()}
        turns.update(extra or {})
        times = {name: [] for name in turns}
        for _ in range(rounds):
            for name, turn in turns.items():
                times[name].append(turn())
    finally:
        for child in children.values():
            with contextlib.suppress(OSError):
                child.stdin.close()
            child.wait()
    return {name: {model: sorted(t[model] for t in runs)[len(runs) // 2] for model in runs[0]}
            for name, runs in times.items()}


def _turn(name, child):
    child.stdin.write("time\n")
    child.stdin.flush()
    return _answer(name, child)


def _answer(name, child):
    line = child.stdout.readline()
    if not line:
        raise RuntimeError(f"the timing process for {name} exited with status {child.wait()}")
    return json.loads(line)


def _geomean(values):
    values = list(values)
    product = 1.0
    for v in values:
        product *= v
    return product ** (1 / len(values))


def _now():
    return time.strftime("%Y-%m-%d %H:%M:%S")


def stderr(line):
    """The log of a measurement that was given none (here and in convplan.py)."""
    print(line, file=sys.stderr, flush=True)

"""Training-speed benchmark: ddl (compiled and NumPy kernels) against PyTorch on the CPU,
numba's compile and cache-load times, data-parallel scaling over MPI, a per-step breakdown and
the roofline. Writes a markdown report (`make bench`).

Every figure is the median of timed repeats after a warm-up, with one BLAS thread per process.
The contestants' repeats alternate within one run, so the machine's noise hits all alike.
A training step is what `ddl.train` does: zero the gradients, forward, cross-entropy, backward,
(all-reduce with the loss and the NaN/inf check), SGD with momentum 0.9.

    python scripts/benchmark.py [--out docs/benchmarks.md] [--repeats 7] [--quick]
"""
import os

# Whether the CPU name was given: set up, ddl puts its own choice in the variable for its children.
GIVEN_CPU_NAME = "NUMBA_CPU_NAME" in os.environ
# Before NumPy or PyTorch start their thread pools.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from threadpoolctl import threadpool_info, threadpool_limits  # noqa: E402

from ddl import kernels, nn  # noqa: E402
from ddl.kernels import jit, tune  # noqa: E402
from ddl.comm import SingleCommunicator, world  # noqa: E402
from ddl.launch import find_mpiexec, rank_env  # noqa: E402
from ddl.models import build, to_torch  # noqa: E402
from ddl.optim import SGD  # noqa: E402
from ddl.parallel import Replicas  # noqa: E402
from ddl.config import Config  # noqa: E402
from ddl.errors import dims  # noqa: E402
from ddl.step import rehearse, train_step  # noqa: E402

MNIST = ((1, 28, 28), 10)  # in_shape and classes of the demo networks' synthetic batches
COLOUR = (3, 32, 32)
# (model, image shape, batches) of the single-process table: the demo networks, and networks as
# users write them (BatchNorm, residual blocks, strided and 1x1 convolutions).
SINGLE = (("seed-cnn", MNIST[0], (64, 256)), ("ref-cnn", MNIST[0], (64, 256)),
          ("resnet-mini", MNIST[0], (64,)), ("resnet-mini", COLOUR, (64,)),
          ("vgg-mini", COLOUR, (64,)))
MODELS = ("seed-cnn", "ref-cnn")    # the roofline's and scaling's networks
BREAKDOWNS = (("seed-cnn", MNIST[0]), ("ref-cnn", MNIST[0]), ("resnet-mini", MNIST[0]),
              ("vgg-mini", COLOUR))
# (ranks, extra environment, label). (MPICH's busy polling, which once made 4 ranks on 2 cores
# far slower (docs/measured.md), no longer shows: ddl's collectives wait in the
# watchdog's sleeping loop.)
# The row of ranks that train alone (no all-reduce) is what sharing the machine costs by itself.
ALONE = "DDL_BENCH_ALONE"
RANKS = ((1, {}, ""), (2, {}, ""), (2, {ALONE: "1"}, " (each trains alone: no all-reduce)"),
         (4, {}, " (oversubscribed)"))
SCALING_MODEL, SCALING_BATCH = "ref-cnn", 64
LR, MOMENTUM = 0.01, 0.9
MICRO_BATCH = Config.micro_batch  # what `ddl train` does with a rank's batch
# On an AVX-512 machine the single-process table is measured again with every library held to
# AVX2, read by each at start-up: the nearest this machine comes to an AVX2 CPU.
# numba needs both names: a CPU name alone changes only LLVM's tuning, and numba would still pass
# the host's AVX-512 to it (an empty feature list leaves Haswell's own: AVX2 and FMA).
AVX2_ONLY = {"NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": "", "OPENBLAS_CORETYPE": "Haswell",
             "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def synthetic(batch, count=4, seed=0, shape=MNIST[0]):
    """`count` batches of 10 classes: images (batch, *shape) float32, labels (batch,)."""
    rng = np.random.default_rng(seed)
    return [(rng.random((batch, *shape), dtype=np.float32), rng.integers(0, 10, batch))
            for _ in range(count)]


def cycle(batches):
    while True:
        yield from batches


# --- the contestants: each is a `step()` closure over its model, optimizer and data -------------
def ddl_step(model_name, batch, comm=None, allreduce_clock=None, kernel_set="numba",
             shape=MNIST[0]):
    """One ddl training step as ddl.train runs it, with the kernels named, on images of `shape`.
    `allreduce_clock`, a one-element list, collects the seconds spent in the gradient
    all-reduce."""
    model = build(model_name, shape, MNIST[1], seed=0, input_grad=False)
    planned(model, kernel_set, shape, batch, comm)
    replicas = Replicas(model, comm or SingleCommunicator())
    optimizer = SGD(model.parameters(), LR, momentum=MOMENTUM)
    criterion = nn.CrossEntropyLoss()
    data = cycle(synthetic(batch, shape=shape))

    def step():
        kernels.use(kernel_set)
        x, y = next(data)
        replicas.zero_grad()
        loss = train_step(model, criterion, x, y, MICRO_BATCH)
        started = time.perf_counter()
        replicas.allreduce_grads(loss)
        if allreduce_clock is not None:
            allreduce_clock[0] += time.perf_counter() - started
        model.step(optimizer)
    return step


def planned(model, kernel_set, shape, batch, comm=None):
    """The convolution plan that `ddl train` makes for `model` (ddl/kernels/convplan.py: each
    layer's algorithm timed once per machine), adopted for the steps that follow."""
    with kernels.using(kernel_set):
        kernels.choose(lambda: rehearse(model, shape, batch, MICRO_BATCH), comm)


def torch_step(model_name, batch, channels_last, shape=MNIST[0]):
    import torch
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = to_torch(build(model_name, shape, MNIST[1], seed=0)).to(memory_format=fmt)
    optimizer = torch.optim.SGD(model.parameters(), LR, momentum=MOMENTUM)
    data = cycle([(torch.from_numpy(x).contiguous(memory_format=fmt), torch.from_numpy(y))
                  for x, y in synthetic(batch, shape=shape)])

    def step():
        x, y = next(data)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return step


def torch_profiled(model_name, batch, shape):
    """(PyTorch's channels_last training step, warmed up, and a torch.profiler to run it in
    that records the shapes of its operations)."""
    from torch.profiler import ProfilerActivity, profile
    step = torch_step(model_name, batch, True, shape)
    for _ in range(3):
        step()
    return step, profile(activities=[ProfilerActivity.CPU], record_shapes=True)


def torch_conv_times(prof):
    """The convolutions that `prof` recorded: {(weight shape, input shape NCHW): (forward ms,
    backward ms) per call}."""
    # op: (where its input's shape is, the weight's following it: forward (input, weight, ...),
    # backward (grad output, input, weight, ...); its column)
    ops = {"aten::mkldnn_convolution": (0, 0), "aten::convolution_backward": (1, 1)}
    times = {}
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key in ops:
            x_at, k = ops[e.key]
            key = (tuple(e.input_shapes[x_at + 1]), tuple(e.input_shapes[x_at]))
            times.setdefault(key, [0.0, 0.0])[k] = e.self_cpu_time_total / e.count / 1e3
    return {key: tuple(ms) for key, ms in times.items()}


def torch_version():
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(1)
    return torch.__version__


# --- timing ---------------------------------------------------------------------------------------
def timed(step, n):
    started = time.perf_counter()
    for _ in range(n):
        step()
    return time.perf_counter() - started


def calibrate(step, seconds, warmup=3, probe=5):
    """Warm `step` up; return how many steps take about `seconds`. A fixed number of steps, so
    ranks that all-reduce in every step stay in lockstep."""
    for _ in range(warmup):
        step()
    return max(2, round(seconds * probe / timed(step, probe)))


def throughput(contestants, batch, repeats, seconds):
    """{name: median images/s}; repeats of the contestants alternate."""
    steps = {name: calibrate(step, seconds) for name, step in contestants.items()}
    rates = {name: [] for name in contestants}
    for _ in range(repeats):
        for name, step in contestants.items():
            rates[name].append(batch * steps[name] / timed(step, steps[name]))
    return {name: float(np.median(r)) for name, r in rates.items()}


def avx2_only(args):
    """single_process's rows from a fresh process held to AVX2, or None on a CPU without
    AVX-512 (where the main table already is AVX2)."""
    with open("/proc/cpuinfo") as f:
        if "avx512f" not in f.read():
            return None
    cmd = [sys.executable, os.path.abspath(__file__), "--single-json", "--repeats",
           str(args.repeats), "--seconds", str(args.seconds)] + (["--quick"] if args.quick else [])
    out = subprocess.run(cmd, env=dict(os.environ, **AVX2_ONLY), capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def single_process(repeats, seconds, with_torch, quick=False):
    """One row per SINGLE entry and batch. `quick` leaves out the NumPy kernels (slow on the
    bigger networks), which the full run keeps."""
    rows, kernel_sets = [], ("numba",) if quick else kernels.NAMES
    for model_name, shape, batches in SINGLE:
        for batch in batches:
            contestants = {f"ddl {k}": ddl_step(model_name, batch, kernel_set=k, shape=shape)
                           for k in kernel_sets}
            if with_torch:
                contestants["torch"] = torch_step(model_name, batch, False, shape)
                contestants["torch channels_last"] = torch_step(model_name, batch, True, shape)
            rates = throughput(contestants, batch, repeats, seconds)
            rows.append(dict(model=model_name, shape=shape, batch=batch, **rates))
            print(f"  {model_name} {dims(shape)} batch {batch}: " + ", ".join(
                f"{k} {v:,.0f}" for k, v in rates.items()), file=sys.stderr)
    return rows


# --- data-parallel scaling: this script re-run under mpiexec -------------------------------------
def worker(repeats, seconds):
    """Rank side of the scaling run: prints (rank 0) aggregate images/s and the all-reduce share."""
    comm, alone = world(), os.environ.get(ALONE) == "1"
    clock = [0.0]
    step = ddl_step(SCALING_MODEL, SCALING_BATCH, None if alone else comm, clock)
    steps = comm.bcast_obj(calibrate(step, seconds))  # equal step counts: no rank waits forever
    rates, shares = [], []
    for _ in range(repeats):
        comm.barrier()
        clock[0] = 0.0
        elapsed = timed(step, steps)
        comm.barrier()
        elapsed = comm.allreduce_obj(elapsed, "max")
        rates.append(comm.size * SCALING_BATCH * steps / elapsed)
        shares.append(comm.allreduce_obj(clock[0] / elapsed) / comm.size)
    # The same all-reduce alone, every rank arriving together: its cost without the wait for a
    # slower rank that the in-step share above includes.
    grads = np.zeros(sum(p.data.size for p in build(SCALING_MODEL, *MNIST).parameters()),
                     np.float32)
    transfer = [0.0] if alone else []
    # the same max-reduced sum on every rank, so every rank stops after the same call
    while not alone and len(transfer) < 50 and sum(transfer) < 2.0:
        comm.barrier()
        started = time.perf_counter()
        comm.allreduce(grads)
        transfer.append(comm.allreduce_obj(time.perf_counter() - started, "max"))
    step_seconds = comm.size * SCALING_BATCH / float(np.median(rates))
    if comm.rank == 0:
        print(json.dumps(dict(ranks=comm.size, images_per_second=float(np.median(rates)),
                              allreduce_share=float(np.median(shares)),
                              transfer_us=1e6 * float(np.median(transfer)),
                              transfer_share=float(np.median(transfer)) / step_seconds)))


def scaling(repeats, seconds, rounds=3):
    """One row per RANKS entry; each figure is the median over `rounds` rounds that run every
    configuration in turn, so a noisy minute on the shared machine hits all of them alike."""
    mpiexec, runs = find_mpiexec(), {i: [] for i in range(len(RANKS))}
    for _ in range(rounds):
        for i, (n, env, label) in enumerate(RANKS):
            cmd = [mpiexec, "-n", str(n), sys.executable, os.path.abspath(__file__), "--worker",
                   "--repeats", str(repeats), "--seconds", str(seconds)]
            out = subprocess.run(cmd, env=dict(rank_env(), **env), capture_output=True,
                                 text=True, timeout=900)
            if out.returncode:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
            runs[i].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  {n} rank(s){label}: {runs[i][-1]['images_per_second']:,.0f} images/s",
                  file=sys.stderr)
    rows = [dict({k: float(np.median([r[k] for r in runs[i]])) for k in runs[i][0]},
                 ranks=n, label=label) for i, (n, _, label) in enumerate(RANKS)]
    single = rows[0]["images_per_second"]
    for row in rows:
        row["efficiency"] = row["images_per_second"] / (row["ranks"] * single)
    return rows


# --- where the time goes --------------------------------------------------------------------------
def layer_breakdown(model_name, batch, repeats, shape=MNIST[0], with_torch=False):
    """[(step, forward ms, backward ms, PyTorch's (forward ms, backward ms) or None)] medians
    over `repeats` steps of the compiled kernels, one row per step that Sequential runs (fused
    groups included), plus loss and optimizer; PyTorch's figures (`with_torch`) are those of
    the same convolution in PyTorch's step. A step holding a layer that runs NumPy code (no
    compiled kernel) is marked as the slow step."""
    kernels.use("numba")
    model = build(model_name, shape, MNIST[1], seed=0, input_grad=False)
    planned(model, "numba", shape, batch)
    replicas = Replicas(model, SingleCommunicator())
    optimizer = SGD(model.parameters(), LR, momentum=MOMENTUM)
    criterion = nn.CrossEntropyLoss()
    steps = model.steps()
    x, y = synthetic(batch, count=1, shape=shape)[0]
    times = np.zeros((max(repeats, 5) + 3, len(steps) + 2, 2))
    inner = _BlockClocks(model, steps, len(times))
    # PyTorch's steps alternate with ddl's, so that both see the machine as it was then.
    torch_step_, prof = (torch_profiled(model_name, batch, shape) if with_torch
                         else (lambda: None, contextlib.nullcontext()))
    with prof:
        for r in range(len(times)):
            inner.repeat = r
            replicas.zero_grad()
            h = x
            for i, step in enumerate(steps):
                started = time.perf_counter()
                h = step.forward(h)
                times[r, i, 0] = time.perf_counter() - started
            started = time.perf_counter()
            criterion(h, y)
            g = criterion.backward()
            times[r, -2, 0] = time.perf_counter() - started
            for i in reversed(range(len(steps))):
                started = time.perf_counter()
                g = steps[i].backward(g)
                times[r, i, 1] = time.perf_counter() - started
            started = time.perf_counter()
            model.step(optimizer)
            times[r, -1, 0] = time.perf_counter() - started
            torch_step_()
    ms = np.median(times[3:], axis=0) * 1e3  # the first steps are warm-up
    torch_ms = torch_conv_times(prof) if with_torch else {}

    def pytorch(layer):         # a convolution alone (fused with nothing) in ddl's step
        if not isinstance(layer, nn.Conv2d):
            return None
        return torch_ms.get((tuple(layer.weight.data.shape), tuple(layer._x_shape)))
    rows = []
    for step, (f, b) in zip(steps, ms):
        rows.append((_describe(step), f, b, pytorch(step)))
        rows += [(f"&nbsp;&nbsp;{name}: {_describe(layer)}"
                  + ("" if t.any() else " (in the pass before it)"),
                  *np.median(t[3:], axis=0) * 1e3, pytorch(layer))
                 for name, (layer, t) in inner.clocks.items() if inner.owner[name] is step]
    return rows + [("cross-entropy (both ways)", *ms[-2], None), ("SGD step", *ms[-1], None)]


class _BlockClocks:
    """Clocks on every leaf layer inside the residual blocks among `steps`, so that a block's
    row is followed by its layers' own (their forward and backward seconds per repeat)."""

    def __init__(self, model, steps, repeats):
        names = {id(m): name for name, m in model.named_modules()}
        self.repeat, self.clocks, self.owner = 0, {}, {}
        for step in steps:
            block = getattr(step, "layer", step)
            if getattr(type(block), "op", None) != "residual":
                continue
            for m in block.modules():
                if not m.named_children():
                    name = names[id(m)]
                    self.clocks[name], self.owner[name] = (m, np.zeros((repeats, 2))), step
                    for method, k in (("run" if hasattr(m, "run") else "forward", 0),
                                      ("backward", 1)):
                        setattr(m, method, self._timed(getattr(m, method), name, k))

    def _timed(self, method, name, k):
        def call(*args, **kwargs):
            started = time.perf_counter()
            out = method(*args, **kwargs)
            self.clocks[name][1][self.repeat, k] += time.perf_counter() - started
            return out
        return call


def _describe(step):
    """A step's one-line name for the table: its layers, and SLOW beside NumPy code."""
    slow = kernels.get("numba").slow_steps(getattr(step, "layer", step))
    text = " ".join(repr(step).split())
    if len(text) >= 90:         # a fused group keeps what joined the layer (" + ReLU", ...)
        head, _, fused = text.rpartition(") + ")
        suffix = " + " + fused if head else ""
        text = text[:max(87 - len(suffix), 30)] + "..." + suffix
    return text + (" **SLOW: NumPy reference path**" if slow else "")


def compile_times():
    """numba's costs in fresh processes: (import s, compiling every kernel into an empty cache in
    one process s, and in as many as there are cores, as `make install` does (s, processes),
    loading them all from that cache s)."""
    processes = jit.cores()
    probe = ("import sys, time; t = time.perf_counter(); import numba; "
             "t = time.perf_counter() - t; from ddl import kernels; "
             "print(t, kernels.warm(processes=int(sys.argv[1])))")

    def run(count, cache):
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        out = subprocess.run([sys.executable, "-c", probe, str(count)], env=env, check=True,
                             text=True, capture_output=True).stdout.split()
        return float(out[0]), float(out[1])

    with tempfile.TemporaryDirectory() as cache:
        _, cold = run(1, cache)
    with tempfile.TemporaryDirectory() as cache:
        _, cold_parallel = run(processes, cache)
        imported, cached = run(processes, cache)        # the same cache, now full
    return imported, cold, (cold_parallel, processes), cached


def training_flops(model, image_shape=(1, 28, 28)):
    """FLOPs (2 x multiply-adds) per training image in Conv2d and Linear: forward, weight gradient
    and input gradient, except the first layer's input gradient (nothing needs it)."""
    total, x, first = 0, np.zeros((1, *image_shape), np.float32), True
    for layer in model:
        x = layer.forward(x)
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            positions = int(np.prod(x.shape[2:]))  # output pixels; () -> 1 for Linear
            total += 2 * layer.weight.data.size * positions * (2 if first else 3)
            first = False
    return total


def sgemm_gflops(n=1024, repeats=7):
    """This core's float32 GEMM speed: the median of `repeats` n x n products."""
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    a @ a
    return 2 * n ** 3 / np.median([timed(lambda: a @ a, 1) for _ in range(repeats)]) / 1e9


# --- the report -----------------------------------------------------------------------------------
def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def blas():
    return "; ".join(f"{i.get('internal_api')} {i.get('version')} ({i.get('architecture')})"
                     for i in threadpool_info() if i.get("user_api") == "blas") or "unknown"


def throughput_table(rows, torch_ver):
    if torch_ver:
        lines = ["| model | images | batch | kernels | ddl | PyTorch | PyTorch channels_last | "
                 "ddl / PyTorch | ddl / PyTorch's best |",
                 "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    else:
        lines = ["PyTorch is not installed (`pip install -e '.[bench]'`): ddl only.", "",
                 "| model | images | batch | kernels | ddl |", "|---|---|---:|---|---:|"]
    for r in rows:
        for k in (k for k in kernels.NAMES if f"ddl {k}" in r):
            ddl = r[f"ddl {k}"]
            line = f"| {r['model']} | {dims(r['shape'])} | {r['batch']} | {k} | {ddl:,.0f} |"
            if torch_ver:
                best = max(r["torch"], r["torch channels_last"])
                line += (f" {r['torch']:,.0f} | {r['torch channels_last']:,.0f} | "
                         f"{ddl / r['torch']:.2f}x | **{ddl / best:.2f}x** |")
            lines.append(line)
    return lines


def report(args, torch_ver, rows, rows_avx2, numba_costs, scale, breakdowns, flops, peak, load):
    command = " ".join([os.path.relpath(sys.executable), "scripts/benchmark.py", *sys.argv[1:]])
    lines = [
        "# Benchmarks", "",
        f"Generated by `{command}` on {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}.", "",
        f"- Machine: {cpu_model()} ({tune.cpu_key().split(' flags:')[0]}), {os.cpu_count()} "
        f"cores; load average {load[0]:.1f} before the run, {load[1]:.1f} after (other work on a "
        "shared machine slows every figure).",
        f"- numba's kernels compiled for CPU `{kernels.target()}`, "
        + ("as $NUMBA_CPU_NAME asks" if GIVEN_CPU_NAME else
           "the tuning's choice for this CPU (docs/tuning.md)")
        + ", outside the AVX2 table. Each convolution runs the algorithm "
        "that `ddl train`'s plan timed fastest for its shape on this machine (docs/tuning.md).",
        f"- Python {platform.python_version()}, NumPy {np.__version__}, numba "
        f"{numba_version()}, PyTorch {torch_ver or 'not installed'}; BLAS: {blas()}.",
        "- One BLAS thread per process: threadpoolctl, OMP/OPENBLAS/MKL_NUM_THREADS=1 and "
        "`torch.set_num_threads(1)`; numba's kernels are single-threaded.",
        f"- Synthetic images of the shape shown, 10 classes; SGD with momentum {MOMENTUM}. "
        f"Each figure is the median of {args.repeats} timed repeats of ~{args.seconds:g} s after "
        "a warm-up; the contestants' repeats alternate.",
        "", "## Single-process training throughput (images/s)", "",
        "One row per kernel set of ddl (`--kernels`): numba is the default, NumPy the "
        "reference.", ""]
    lines += throughput_table(rows, torch_ver)
    if rows_avx2:
        lines += ["", "The same, in a process that holds numba, OpenBLAS and PyTorch to AVX2 "
                  f"({', '.join(f'`{k}={v}`' for k, v in AVX2_ONLY.items())}): the instruction "
                  "set of an AVX2 CPU on this machine's cores.", ""]
        lines += throughput_table(rows_avx2, torch_ver)
    lines += ["", "Layers that the numba kernels run through the NumPy reference (no compiled "
              "kernel: the slow steps): " + "; ".join(
                  f"{name}: {', '.join(fallbacks(name)) or 'none'}"
                  for name in dict.fromkeys(model for model, _, _ in SINGLE)) + "."]
    imported, cold, (cold_parallel, processes), cached = numba_costs
    lines += ["", f"numba, in a fresh process: import {imported:.2f} s; compiling every kernel "
              f"(float32) into an empty cache {cold:.1f} s in one process, {cold_parallel:.1f} s "
              f"in {processes} (`make install` does it once, a process a core); loading them all "
              f"from the cache {cached:.2f} s (what a training run pays at start)."]
    ref = next(r["ddl numba"] for r in rows if r["model"] == "ref-cnn" and r["batch"] == 64)
    roof = peak * 1e9 / flops
    lines += ["", "## Roofline (ref-cnn, batch 64)", "",
              f"ref-cnn costs {flops / 1e6:.1f} MFLOP per training image as direct convolutions "
              f"and GEMMs (Conv2d and Linear; the first layer computes no input gradient). This "
              f"core's sgemm speed, the median of 1024x1024 products, is {peak:.0f} GFLOPS, so a "
              f"perfect GEMM-only step would train {roof:,.0f} images/s. ddl reaches {ref:,.0f}: "
              f"**{ref / roof:.0%} of the roofline**. ddl's second convolution runs Winograd "
              "F(2x2, 3x3), which needs 2.25x fewer multiplications than the FLOPs counted here, "
              "so the share could pass 100%.", ""]
    if scale:
        lines += [f"## Data-parallel scaling ({SCALING_MODEL}, {SCALING_BATCH} images per rank, "
                  f"one BLAS thread per rank, {os.cpu_count()} cores)", "",
                  "| ranks | images/s (all ranks) | efficiency | all-reduce share of a step "
                  "| all-reduce alone | its share of a step |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in scale:
            lines.append(f"| {r['ranks']}{r['label']} | {r['images_per_second']:,.0f} | "
                         f"{r['efficiency']:.0%} | {r['allreduce_share']:.1%} | "
                         f"{r['transfer_us']:,.0f} us | {r['transfer_share']:.1%} |")
        lines += ["", "Efficiency = aggregate / (ranks x the 1-rank figure, also run under "
                  "mpiexec). Each figure is the median of 3 rounds that run every configuration "
                  "in turn. The in-step all-reduce share includes waiting for the slowest rank; "
                  "'all-reduce alone' times the same call on the flat gradient buffer with every "
                  "rank arriving together (after a barrier), median of 50 calls (or of 2 s of "
                  "them). Ranks that train alone, each on its own model, lose only what sharing "
                  "the machine costs (memory bandwidth, the shared L3 cache, other jobs): no "
                  "way of communicating wins that back.", ""]
    for (model_name, shape), layers in breakdowns.items():
        total = sum(f + b for name, f, b, _ in layers if not name.startswith("&nbsp;"))
        lines += [f"## Where the time goes ({model_name}, {dims(shape)}, batch 64, numba "
                  "kernels, one step)", "",
                  "One row per step that Sequential runs: fused groups are one row, a residual "
                  "block with the ReLU after it too, followed by its layers' own rows (indented: "
                  "the block's share includes them). PyTorch: the same convolution in PyTorch's "
                  "channels_last step, from torch.profiler (per call, where two layers have one "
                  "shape).", "",
                  "| step | forward ms | backward ms | share | PyTorch forward ms | PyTorch "
                  "backward ms |", "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {name} | {f:.2f} | {b:.2f} | {(f + b) / total:.0%} | "
                  + (f"{torch_ms[0]:.2f} | {torch_ms[1]:.2f} |" if torch_ms else "| |")
                  for name, f, b, torch_ms in layers]
        lines += [f"| total | | | {total:.1f} ms | | |", ""]
        pairs = [(f + b, sum(t)) for name, f, b, t in layers if t]
        if pairs:
            ours, theirs = map(sum, zip(*pairs))
            lines += [f"The {len(pairs)} convolutions with a PyTorch figure take {ours:.1f} ms "
                      f"of ddl's step and {theirs:.1f} ms of PyTorch's: ddl runs them at "
                      f"**{theirs / ours:.2f}x** PyTorch's speed; the rest of the step takes "
                      f"{total - ours:.1f} ms.", ""]
    return "\n".join(lines)


def fallbacks(model_name):
    """The layers of a named model that the numba backend runs through NumPy code."""
    return kernels.get("numba").slow_steps(build(model_name, *MNIST))


def numba_version():
    import numba
    return numba.__version__


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/benchmarks.md", help="markdown report to write")
    parser.add_argument("--repeats", type=int, help="timed repeats per figure (default 7; 3 quick)")
    parser.add_argument("--seconds", type=float, help="length of one repeat (default 0.3; 0.1 "
                        "quick)")
    parser.add_argument("--quick", action="store_true", help="short repeats: a smoke run")
    parser.add_argument("--no-scaling", action="store_true", help="skip the MPI runs")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--single-json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.repeats = args.repeats or (3 if args.quick else 7)
    args.seconds = args.seconds or (0.1 if args.quick else 0.3)
    threadpool_limits(1)
    if args.worker:
        return worker(args.repeats, args.seconds)
    if args.single_json:
        return print(json.dumps(single_process(args.repeats, args.seconds,
                                               torch_version() is not None, args.quick)))

    load_before = os.getloadavg()[0]
    print(f"CPU: {cpu_model()}", file=sys.stderr)
    torch_ver = torch_version()
    print("single process" + ("" if torch_ver else " (PyTorch not installed: ddl only)"),
          file=sys.stderr)
    rows = single_process(args.repeats, args.seconds, torch_ver is not None, args.quick)
    print("single process, held to AVX2", file=sys.stderr)
    rows_avx2 = avx2_only(args)
    scale = None
    if not args.no_scaling:
        print("data-parallel scaling", file=sys.stderr)
        scale = scaling(args.repeats, args.seconds)
    breakdowns = {(name, shape): layer_breakdown(name, 64, args.repeats, shape,
                                                 torch_ver is not None)
                  for name, shape in BREAKDOWNS}
    flops, peak = training_flops(build("ref-cnn", *MNIST)), sgemm_gflops()
    print("numba's compile and cache-load times", file=sys.stderr)
    numba_costs = compile_times()
    load = (load_before, os.getloadavg()[0])
    text = report(args, torch_ver, rows, rows_avx2, numba_costs, scale, breakdowns, flops, peak,
                  load)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()

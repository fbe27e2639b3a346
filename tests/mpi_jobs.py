"""Jobs that the MPI tests run under `mpiexec -n N python tests/mpi_jobs.py JOB OUT [k=v ...]`.

Each job writes what it saw into the folder OUT (one file per rank, or rank 0's summary); the
assertions live in the pytest process, so a failure shows up as an ordinary test failure.
"""
import json
import os
import sys
from pathlib import Path

import numpy as np

from ddl.comm import world
from ddl.config import Config
from ddl.evaluation import eval_loader, evaluate, restore
from ddl.train import run


def _config(pairs):
    kinds = {f.name: f.type for f in Config.__dataclass_fields__.values()}
    cast = {int: int, float: float, bool: lambda v: v == "1", str: str}
    return Config(**{k: cast[kinds[k]](v) for k, v in (p.split("=", 1) for p in pairs)})


def job_comm(comm, out, _):
    x = np.full(5, comm.rank + 1, np.float32)
    comm.allreduce(x)
    y = np.full(3, comm.rank, np.float64)
    comm.iallreduce(y, "max").wait()
    z = np.arange(4.0) if comm.rank == 0 else np.zeros(4)
    comm.bcast(z)
    got = dict(allreduce=x.tolist(), imax=y.tolist(), bcast=z.tolist(),
               obj=comm.allreduce_obj(comm.rank), gathered=comm.allgather_obj(comm.rank * 10),
               bcast_obj=comm.bcast_obj({"from": comm.rank}), size=comm.size)
    (out / f"rank{comm.rank}.json").write_text(json.dumps(got))


def job_train(comm, out, pairs, stop_after=None):
    (out / f"pid{comm.rank}").write_text(str(os.getpid()))

    def stop(epoch, _model):
        if epoch == stop_after:
            sys.exit(0)
    history, model = run(_config(pairs), comm, on_epoch_end=stop)
    np.save(out / f"params{comm.rank}.npy", np.concatenate([p.data.ravel()
                                                            for p in model.parameters()]))
    if comm.rank == 0:
        (out / "history.json").write_text(json.dumps(history))


def job_interrupt(comm, out, pairs):
    job_train(comm, out, pairs, stop_after=1)


def job_warm(comm, out, _):
    """Each rank's kernels.warm (rank 0 first) of the pooling and normalisation kernels: when
    its compiling or loading ended, and how long it took. Every kernel goes the same way;
    compiling them all (15 s, docs/benchmarks.md) is make install's, and its own check."""
    import time
    from ddl import kernels
    from ddl.kernels import jit
    kernels.get()                   # registers every kernel
    some = ("ddl.kernels.pool", "ddl.kernels.norm")
    jit._KERNELS[:] = [k for k in jit._KERNELS if k[0].py_func.__module__ in some]
    seconds = kernels.warm(comm)
    (out / f"warm{comm.rank}.json").write_text(json.dumps(dict(end=time.time(),
                                                               seconds=seconds)))


def job_plan(comm, out, _):
    """Each rank's convolution plan (kernels.choose), and how often it rehearsed the model."""
    from ddl import kernels
    from ddl.kernels import convplan
    from ddl.models import build
    from ddl.step import rehearse
    rehearsals = []

    def rehearse_once():
        rehearsals.append(1)
        rehearse(build("ref-cnn", (1, 28, 28), 10, seed=0, input_grad=False), (1, 28, 28), 8, 0)
    kernels.warm(comm)
    kernels.choose(rehearse_once, comm)
    (out / f"plan{comm.rank}.json").write_text(json.dumps(dict(
        rehearsals=len(rehearsals), plan={str(c): a for c, a in convplan._chosen.items()})))


def job_evaluate(comm, out, pairs):
    from ddl.data import H5Dataset
    opts = dict(p.split("=", 1) for p in pairs)
    model, _, _ = restore(opts["checkpoint"], comm)
    loss, acc = evaluate(model, eval_loader(H5Dataset(opts["data"], "test"), comm), comm)
    if comm.rank == 0:
        (out / "eval.json").write_text(json.dumps(dict(loss=loss, accuracy=acc)))


def job_diverge(comm, out, _):
    from ddl.models import build
    from ddl.errors import ReplicaDivergence
    from ddl.parallel import Replicas
    model = build("seed-cnn", (1, 28, 28), 10, seed=comm.rank)   # the start broadcast fixes it
    replicas = Replicas(model, comm)
    replicas.check()
    if comm.rank == 1:
        model.parameters()[0].data.flat[0] += 1e-3
    try:
        replicas.check()
        result = "no error"
    except ReplicaDivergence as e:
        result = str(e)
    (out / f"rank{comm.rank}.txt").write_text(result)


def job_fail(comm, out, pairs):
    """Rank 1 raises in its third step; the CLI must abort the whole job."""
    from ddl import cli, parallel
    calls = []
    original = parallel.Replicas.allreduce_grads

    def flaky(self, *values, **signals):
        calls.append(1)
        if comm.rank == 1 and len(calls) == 3:
            raise ZeroDivisionError("injected failure on rank 1")
        return original(self, *values, **signals)
    parallel.Replicas.allreduce_grads = flaky
    cli.main(["train", "--quiet", *pairs])


def job_nan(comm, out, args):
    """`ddl train ARGS` with a NaN in rank 1's gradient at its second step, and only there."""
    from ddl import cli, train
    original, steps = train.train_step, []

    def poisoned(model, *rest):
        loss = original(model, *rest)
        steps.append(1)
        if comm.rank == 1 and len(steps) == 2:
            model.parameters()[0].grad.flat[0] = np.nan
        return loss
    train.train_step = poisoned
    cli.main(["train", *args])


def job_late(comm, out, args):
    """`ddl train ARGS[1:]` with rank 1 arriving ARGS[0] seconds late at its second step's
    all-reduce: a slow rank, not a hung one."""
    import time
    from ddl import cli, train
    original, steps = train.train_step, []

    def late(*rest):
        steps.append(1)
        if comm.rank == 1 and len(steps) == 2:
            time.sleep(float(args[0]))
        return original(*rest)
    train.train_step = late
    cli.main(["train", *args[1:]])


def job_drift(comm, out, args):
    """`ddl train ARGS` with rank 1's first weight nudged after its third step: replicas that
    drift apart, as a user's nondeterministic layer would make them."""
    from ddl import cli, train
    original, steps = train.train_step, []

    def nudged(model, *rest):
        steps.append(1)
        if comm.rank == 1 and len(steps) == 3:
            model.parameters()[0].data.flat[0] += 1e-3
        return original(model, *rest)
    train.train_step = nudged
    cli.main(["train", *args])


def job_quota(comm, out, args):
    """`ddl train ARGS[1:]` with files limited to ARGS[0] bytes, as a quota would: a write past
    that fails with EFBIG. Set only now, since MPI's start-up writes shared-memory files."""
    import resource
    import signal
    from ddl import cli
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(args[0]), int(args[0])))
    cli.main(["train", *args[1:]])


def job_behind(comm, out, args):
    """Ranks 0 and 1 finish a first wait and hang in a second; rank 2 hangs in its first, as a
    rank does whose collective completed on the others but not on it; rank 3 makes no MPI call
    for 10 s ("silent"), or hangs in its first wait too. The watchdog's verdict, timeout 1 s,
    goes to rank{reporter}.txt."""
    import time
    from ddl.errors import Hung
    from ddl.watchdog import Scope
    MPI, raw, dog = comm.MPI, comm.comm, comm.watchdog
    scope = Scope(timeout=1)
    never = np.empty(1)
    try:
        if comm.rank < 2:
            other = 1 - comm.rank
            got = np.empty(1)
            done = [raw.Isend(np.ones(1), other), raw.Irecv(got, other)]
            MPI.Request.Waitall(done)
            dog.wait(MPI.REQUEST_NULL, "first wait", scope)
            dog.wait(raw.Irecv(never, 3), "second wait", scope)
        elif comm.rank == 2 or args[0] != "silent":
            dog.wait(raw.Irecv(never, 3 if comm.rank == 2 else 2), "first wait", scope)
        else:
            time.sleep(10)
    except Hung as e:
        (out / f"rank{comm.rank}.txt").write_text(str(e))
        comm.abort(5)


def job_exchange(comm, out, args):
    """ARGS[0] steps of ref-cnn's gradients exchanged with --compress ARGS[1]: each rank's own
    random gradients (scaled by the step, so that they differ), through the overlapped path of
    a real backward for `none`. Writes the sum of the gradients that each rank produced and of
    the means that the exchange applied, its final error, and (for `none`) whether every step
    equalled one all-reduce of the whole buffer bit for bit. ARGS[2] "thread": the progress
    thread moves the buckets on, as across hosts."""
    from ddl.models import build
    from ddl.nn import CrossEntropyLoss
    from ddl.parallel import Replicas
    from ddl.progress import Progress
    from ddl.step import train_step
    steps, compress = int(args[0]), args[1]
    model = build("ref-cnn", (1, 28, 28), 10, seed=0, input_grad=False)
    replicas = Replicas(model, comm, compress=compress)
    if args[2:] == ["thread"]:
        replicas.exchange.progress = Progress()
    rng = np.random.default_rng(comm.rank)
    produced, applied, exact = 0.0, 0.0, True
    for step in range(steps):
        replicas.zero_grad()
        x = rng.standard_normal((16, 1, 28, 28)).astype(np.float32)
        y = rng.integers(0, 10, 16)
        if compress == "none":      # the same backward twice: plain, then overlapped
            train_step(model, CrossEntropyLoss(), x, y, 8)
            whole = replicas.reduced.copy()
            replicas.zero_grad()
            loss = train_step(model, CrossEntropyLoss(), x, y, 8, last=replicas.overlapping)
        else:
            loss = 1.0
            replicas.grad[...] = rng.standard_normal(replicas.grad.size) * (step + 1)
            whole = replicas.reduced.copy()
        produced = produced + whole[3:].astype(np.float64)
        whole[:3] = loss, 0, 0
        comm.allreduce(whole)
        whole *= np.float32(1 / comm.size)
        replicas.allreduce_grads(loss)
        exact &= bool(np.array_equal(whole, replicas.reduced))
        applied = applied + replicas.grad.astype(np.float64)
    error = getattr(replicas.exchange, "error", np.zeros(1))
    np.savez(out / f"rank{comm.rank}.npz", produced=produced, applied=applied, error=error,
             exact=exact, sent=replicas.exchange.bytes_per_step()
             if hasattr(replicas.exchange, "bytes_per_step") else 0)


def job_hang_in_backward(comm, out, args):
    """`ddl train ARGS` with rank 1 stopping for 30 s inside its second step's backward, after
    its first bucket of gradients has started."""
    import time
    from ddl import cli, exchange
    after, finish, finished = exchange.Exact.after, exchange.Exact.finish, []

    def stuck(self, step):
        after(self, step)
        if comm.rank == 1 and self.started and len(finished) == 1:
            time.sleep(30)

    def count(self):
        finish(self)
        finished.append(1)
    exchange.Exact.after, exchange.Exact.finish = stuck, count
    cli.main(["train", *args])


if __name__ == "__main__":
    name, folder, *rest = sys.argv[1:]
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    globals()[f"job_{name}"](world(), out, rest)

"""What the failure machinery costs in throughput: the watchdog's waits, the timeline, checkpoints
every 100 steps. Prints markdown tables (figures for docs/overheads.md).

    python scripts/overhead.py [--rounds 10] [--data data/mnist.h5]

A shared machine's other load moves a whole epoch's throughput from one run to the next far more
than any of these costs (docs/overheads.md), so each is measured where it can be told apart:

- watchdog, timeline: training steps of seed-cnn (batch 64 per rank, synthetic data) on 2 ranks,
  and on 4 ranks sharing 2 cores, in blocks of STEPS that alternate within one job (the order
  swapped every round) between three ways to end a step: MPI's own blocking MPI_Allreduce, the
  watchdog's wait (`comm.allreduce`, what ddl runs), and the watchdog with the timeline recording
  (its laps, and the barrier before the all-reduce).
- checkpoints: one epoch of `ddl launch -n 2 -- train` (the recipe, seed-cnn) with
  `--checkpoint-every 100 --timeline`: the time every rank spends in the checkpoints during the
  epoch against the time of its steps, from the trace; and the epoch's images/s with and without
  `--checkpoint-every 100`, alternating, as a whole-run check.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from ddl.launch import find_mpiexec, rank_env

STEPS = 150                  # a block of steps in the watchdog comparison


def worker(rounds):
    """Rank side of the step comparison: prints rank 0's images/s per way to end a step."""
    from threadpoolctl import threadpool_limits
    from ddl import kernels, nn
    from ddl.comm import world
    from ddl.models import build
    from ddl.optim import SGD
    from ddl.parallel import Replicas
    from ddl.timeline import Off, Timeline
    from ddl.step import train_step
    threadpool_limits(1)
    comm = world()
    kernels.warm(comm)
    model = build("seed-cnn", (1, 28, 28), 10, seed=0, input_grad=False)
    replicas = Replicas(model, comm)
    optimizer, criterion = SGD(model.parameters(), 0.01, momentum=0.9), nn.CrossEntropyLoss()
    rng = np.random.default_rng(comm.rank)
    data = [(rng.random((64, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, 64))
            for _ in range(4)]
    buf, MPI, off, on = replicas.reduced, comm.MPI, Off(), Timeline(comm)
    ways = {"MPI_Allreduce": (lambda: comm.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM), off),
            "watchdog": (lambda: comm.allreduce(buf), off),
            "watchdog + timeline": (lambda: comm.allreduce(buf), on)}
    rates = {way: [] for way in ways}
    for r in range(rounds):
        for way in (list(ways) if r % 2 == 0 else list(ways)[::-1]):
            allreduce, timeline = ways[way]
            comm.barrier()
            started = time.perf_counter()
            for i in range(STEPS):
                x, y = data[i % len(data)]
                timeline.lap("data")
                replicas.zero_grad()
                buf[0] = train_step(model, criterion, x, y, 64, timeline=timeline)
                timeline.sync(comm)
                allreduce()
                timeline.lap("all-reduce")
                model.step(optimizer)
                timeline.lap("optimizer")
            elapsed = comm.allreduce_obj(time.perf_counter() - started, "max")
            rates[way].append(STEPS * 64 * comm.size / elapsed)
    if comm.rank == 0:
        print(json.dumps(rates))


def step_rows(rounds):
    rows = []
    for n in (2, 4):
        cmd = [find_mpiexec(), "-n", str(n), sys.executable, __file__, "--worker", "--rounds",
               str(rounds)]
        out = subprocess.run(cmd, env=rank_env(), capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
        rates = json.loads(out.stdout.strip().splitlines()[-1])
        where = f"{n} ranks" + (" on 2 cores" if n > 2 else "")
        rows.append((f"watchdog's wait against MPI_Allreduce, {where}", rates["MPI_Allreduce"],
                     rates["watchdog"]))
        rows.append((f"timeline, {where}", rates["watchdog"], rates["watchdog + timeline"]))
    return rows


def epoch(data, folder, extra):
    """One epoch of the recipe on 2 ranks with `extra` options in the empty `folder`: its
    images/s."""
    for name in os.listdir(folder):
        os.remove(os.path.join(folder, name))
    metrics = os.path.join(folder, "m.jsonl")
    subprocess.run([sys.executable, "-m", "ddl", "launch", "-n", "2", "--", "train", "--data",
                    data, "--epochs", "1", "--quiet", "--metrics", metrics,
                    "--checkpoint", os.path.join(folder, "c.h5"), *extra],
                   env=rank_env(), check=True, stdin=subprocess.DEVNULL)
    with open(metrics) as f:
        return json.loads(f.readline())["images_per_second"]


def checkpoint_share(trace):
    """Per rank: seconds in the checkpoints written during the epoch, over seconds of steps."""
    shares = []
    for rank in sorted({e["tid"] for e in trace["traceEvents"]}):
        track = [e for e in trace["traceEvents"] if e["ph"] == "X" and e["tid"] == rank]
        end = min(e["ts"] for e in track if e["name"] == "evaluation")
        saving = sum(e["dur"] for e in track if e["name"] == "checkpoint" and e["ts"] < end)
        stepping = sum(e["dur"] for e in track if e["cat"] == "step")
        shares.append(saving / stepping)
    return shares


def checkpoint_rows(data, rounds):
    every = ["--checkpoint-every", "100"]
    shares, rates = [], {0: [], 1: []}
    with tempfile.TemporaryDirectory() as folder:
        for r in range(rounds):
            for i in ((0, 1) if r % 2 == 0 else (1, 0)):
                rates[i].append(epoch(data, folder, every if i else []))
        for _ in range(3):
            epoch(data, folder, every + ["--timeline", os.path.join(folder, "t.json")])
            with open(os.path.join(folder, "t.json")) as f:
                shares += checkpoint_share(json.load(f))
    return [("checkpoint every 100 steps, 1 epoch on 2 ranks", rates[0], rates[1])], shares


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--data", default="data/mnist.h5")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.rounds)
    rows = step_rows(args.rounds)        # the quick part first: a broken worker shows at once
    more, shares = checkpoint_rows(args.data, args.rounds // 2)
    rows += more
    print("| what | without (img/s, median) | with | cost: median of the rounds' ratios (each "
          "round's) |")
    print("| --- | --- | --- | --- |")
    for label, without, with_ in rows:
        ratios = [1 - w / wo for wo, w in zip(without, with_)]
        print(f"| {label} | {np.median(without):,.0f} | {np.median(with_):,.0f} | "
              f"{100 * np.median(ratios):+.1f}% ({', '.join(f'{100 * r:+.1f}' for r in ratios)})"
              f" |")
    print(f"\nTime in the checkpoints of an epoch (every 100 steps) over the time of its steps, "
          f"per rank and run: {', '.join(f'{100 * s:.2f}%' for s in shares)} (median "
          f"{100 * np.median(shares):.2f}%)")


if __name__ == "__main__":
    main()

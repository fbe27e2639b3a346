"""What the failure machinery costs in throughput: the watchdog's waits, checkpoints every 100
steps, the timeline. Prints a markdown table (figures for the README).

    python scripts/overhead.py [--rounds 5] [--data data/mnist.h5]

- watchdog: training steps of seed-cnn (batch 64 per rank, synthetic data) on 2 ranks, and on 4
  ranks sharing 2 cores, with the gradient all-reduce finished by the watchdog's wait
  (`comm.allreduce`) or by MPI's own blocking MPI_Allreduce; blocks of steps alternate within one
  job, the order swapped every round.
- checkpoints, timeline: one epoch of `ddl launch -n 2 -- train` (seed-cnn, the recipe) with
  `--checkpoint-every 100` or `--timeline` against the same run without, alternating, the order
  swapped every round; images/s of the epoch's steps, from the metrics file.
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
    """Rank side of the watchdog comparison: prints rank 0's images/s per way of waiting."""
    from threadpoolctl import threadpool_limits
    from ddl import kernels, nn
    from ddl.comm import world
    from ddl.models import build
    from ddl.optim import SGD
    from ddl.parallel import Replicas
    from ddl.train import train_step
    threadpool_limits(1)
    comm = world()
    kernels.warm(comm)
    model = build("seed-cnn", seed=0, input_grad=False)
    replicas = Replicas(model, comm)
    optimizer, criterion = SGD(model.parameters(), 0.01, momentum=0.9), nn.CrossEntropyLoss()
    rng = np.random.default_rng(comm.rank)
    data = [(rng.random((64, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, 64))
            for _ in range(4)]
    buf, MPI = replicas.reduced, comm.MPI
    ways = {"watchdog": lambda: comm.allreduce(buf),
            "MPI_Allreduce": lambda: comm.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)}
    rates = {way: [] for way in ways}
    for r in range(rounds):
        for way in (list(ways) if r % 2 == 0 else list(ways)[::-1]):
            comm.barrier()
            started = time.perf_counter()
            for i in range(STEPS):
                x, y = data[i % len(data)]
                replicas.zero_grad()
                buf[-1] = train_step(model, criterion, x, y, 64)
                ways[way]()
                model.step(optimizer)
            elapsed = comm.allreduce_obj(time.perf_counter() - started, "max")
            rates[way].append(STEPS * 64 * comm.size / elapsed)
    if comm.rank == 0:
        print(json.dumps(rates))


def watchdog_rows(rounds):
    rows = []
    for n in (2, 4):
        out = subprocess.run([find_mpiexec(), "-n", str(n), sys.executable, __file__, "--worker",
                              "--rounds", str(rounds)], env=rank_env(), capture_output=True,
                             text=True, check=True)
        rates = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append((f"watchdog's wait, {n} ranks" + (" on 2 cores" if n > 2 else ""),
                     rates["MPI_Allreduce"], rates["watchdog"]))
    return rows


def epoch_rate(data, folder, extra):
    """images/s of one epoch of the recipe on 2 ranks, with `extra` options."""
    for name in os.listdir(folder):
        os.remove(os.path.join(folder, name))
    metrics = os.path.join(folder, "m.jsonl")
    subprocess.run([sys.executable, "-m", "ddl", "launch", "-n", "2", "--", "train", "--data",
                    data, "--epochs", "1", "--quiet", "--metrics", metrics, *extra],
                   env=rank_env(), check=True, stdin=subprocess.DEVNULL)
    with open(metrics) as f:
        return json.loads(f.readline())["images_per_second"]


def run_rows(data, rounds):
    variants = {"checkpoint every 100 steps": (["--checkpoint", "{d}/c.h5"],
                                               ["--checkpoint", "{d}/c.h5",
                                                "--checkpoint-every", "100"]),
                "timeline": ([], ["--timeline", "{d}/t.json"])}
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for label, (without, with_) in variants.items():
            rates = {0: [], 1: []}
            for r in range(rounds):
                for i in ((0, 1) if r % 2 == 0 else (1, 0)):
                    extra = [a.format(d=folder) for a in (without, with_)[i]]
                    rates[i].append(epoch_rate(data, folder, extra))
            rows.append((label, rates[0], rates[1]))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--data", default="data/mnist.h5")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.rounds)
    rows = watchdog_rows(args.rounds) + run_rows(args.data, args.rounds)
    print("| what | without (img/s, median) | with | cost (median of the rounds' ratios) |")
    print("| --- | --- | --- | --- |")
    for label, without, with_ in rows:
        ratios = [1 - w / wo for wo, w in zip(without, with_)]
        print(f"| {label} | {np.median(without):,.0f} | {np.median(with_):,.0f} | "
              f"{100 * np.median(ratios):+.1f}% (rounds: "
              f"{', '.join(f'{100 * r:+.1f}%' for r in ratios)}) |")


if __name__ == "__main__":
    main()

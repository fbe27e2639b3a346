"""The streaming loader (ddl.data.Loader: each batch read from the file when it is made) against
the loader it replaced (each rank's whole shard read into memory at the start of every epoch).
Prints markdown tables (figures for docs/streaming.md).

    python scripts/loader_bench.py [--rounds 5] [--data data/mnist.h5] [--big /tmp/2m.h5]
                                   [--only reads|loader|training]

- reads: microseconds per row of a random batch read from the file by h5py (with and without
  HDF5's chunk cache, a slice per row or one fancy-indexed selection) and by H5Dataset.read_raw.

- loader only: the images/s that one Loader, its prefetch thread included, delivers to a consumer
  that does nothing else: rank 0 of 2, the recipe's global batch of 128 and --shift 1, one whole
  epoch each time, the two loaders alternating (order swapped every round) in one process. With
  --big, the streaming loader alone on that file too (random rows of a file larger than a shard
  that fits in memory).
- training: seed-cnn's training steps on 2 ranks (the recipe: batch 128, micro-batch 64, SGD),
  fed by one loader or the other, in blocks of STEPS that alternate within one MPI job, as in
  scripts/overhead.py: a shared machine's load then moves both alike. Per block: images/s, CPU
  time per step (the loader's thread included), and the time a step waited for its batch (near
  0 while the prefetch thread keeps up).

A shared machine's other load moves single figures a lot: compare the ratios, taken within rounds.
"""
import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

from ddl.data import DistributedSampler, H5Dataset, Loader, draws, translate
from ddl.launch import find_mpiexec, rank_env

STEPS = 120          # training steps in a block of the training comparison
BATCH, SHIFT = 128, 1


class InMemoryLoader(Loader):
    """The loader as it was before it streamed (ddl up to this change): each epoch reads the
    rank's whole shard into one uint8 array, then gathers, augments and normalises its batches."""

    def _epoch(self, batches, epoch):
        rows = np.unique(np.concatenate(batches or [np.empty(0, np.int64)]))
        images, labels = self.dataset.read_raw(rows)
        shifts, flips = draws(self.sampler.seed, epoch, self.sampler.n, self.shift, self.flip)
        for batch in batches:
            where = np.searchsorted(rows, batch)
            x = images[where]
            if shifts is not None:
                x = translate(x, shifts[batch].astype(np.intp), self.shift)
            if flips is not None:
                mirrored = flips[batch]
                x[mirrored] = x[mirrored, :, :, ::-1]
            yield self.dataset.normalize(x), labels[where]


LOADERS = {"in-memory": InMemoryLoader, "streaming": Loader}


def loader_rate(kind, dataset, epoch, prefetch):
    """Images/s of one whole epoch of rank 0 of 2, and CPU microseconds per image (the process's:
    the loader's work, its thread's included, and nothing else)."""
    sampler = DistributedSampler(dataset.n, 2, 0, BATCH, seed=0)
    loader = LOADERS[kind](dataset, sampler, shift=SHIFT, prefetch=prefetch)
    loader.set_epoch(epoch)
    started, cpu = time.perf_counter(), time.process_time()
    images = sum(len(y) for _, y in loader)
    return images / (time.perf_counter() - started), (time.process_time() - cpu) / images * 1e6


def loader_rows(data, big, rounds):
    rates = {kind: [] for kind in LOADERS}
    cpu = {kind: [] for kind in LOADERS}
    with H5Dataset(data, "train") as dataset:
        for r in range(rounds):
            for kind in (list(LOADERS) if r % 2 == 0 else list(LOADERS)[::-1]):
                rates[kind].append(loader_rate(kind, dataset, r, True)[0])
                cpu[kind].append(loader_rate(kind, dataset, r, False)[1])
    rows = [("loader only, MNIST, rank 0 of 2", rates["in-memory"], rates["streaming"]),
            ("loader only, CPU us per image (no prefetch thread)", cpu["in-memory"],
             cpu["streaming"])]
    if big:
        with H5Dataset(big, "train") as dataset:
            # An epoch of 2M images is long: time the first 200 batches of an epoch instead.
            sampler = DistributedSampler(dataset.n, 2, 0, BATCH, seed=0)
            streamed = []
            for r in range(rounds):
                loader = Loader(dataset, sampler, shift=SHIFT)
                loader.set_epoch(r)
                started, images = time.perf_counter(), 0
                for k, (_, y) in enumerate(loader):
                    images += len(y)
                    if k == 199:
                        break
                streamed.append(images / (time.perf_counter() - started))
        rows.append((f"loader only, {dataset.n:,} images, rank 0 of 2, 200 batches", None,
                     streamed))
    return rows


def read_rows(path, rounds):
    """Microseconds per row of a random sorted batch of 64 rows (rank 0's of the recipe's 128) read
    four ways: h5py slices per row with HDF5's default chunk cache (1 MiB), the same without a
    chunk cache, h5py fancy indexing (one selection of all rows) without one, and read_raw."""
    import h5py
    rng = np.random.default_rng(0)
    times = {}
    for cache, how in [(None, "slices"), (0, "slices"), (0, "fancy"), (0, "read_raw")]:
        options = {} if cache is None else dict(rdcc_nbytes=cache)
        with h5py.File(path, "r", **options) as f, H5Dataset(path, "train") as dataset:
            images = f["train/images"]
            batches = [np.sort(rng.choice(len(images), BATCH // 2, replace=False))
                       for _ in range(20 * rounds)]
            started = time.perf_counter()
            for rows in batches:
                if how == "slices":
                    [images[r:r + 1] for r in rows.tolist()]
                else:
                    images[rows] if how == "fancy" else dataset.read_raw(rows)
            spent = (time.perf_counter() - started) / len(batches) / (BATCH // 2) * 1e6
        name = "read_raw (pread)" if how == "read_raw" else \
            f"h5py {how}, chunk cache {'default' if cache is None else cache}"
        times[name] = spent
    return times


def worker(data, rounds):
    """Rank side of the training comparison: prints rank 0's images/s per loader and block."""
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
    model = build("seed-cnn", (1, 28, 28), 10, seed=0, input_grad=False)
    replicas = Replicas(model, comm)
    optimizer, criterion = SGD(model.parameters(), 0.01, momentum=0.9), nn.CrossEntropyLoss()
    dataset = H5Dataset(data, "train")

    def batches(kind):     # endless: epoch after epoch, as training runs
        loader = LOADERS[kind](dataset, DistributedSampler(dataset.n, comm.size, comm.rank,
                                                           BATCH, seed=0), shift=SHIFT)
        for epoch in range(1 << 30):
            loader.set_epoch(epoch)
            yield from loader
    feeds = {kind: batches(kind) for kind in LOADERS}
    rates, cpu_ms, wait_ms = ({kind: [] for kind in LOADERS} for _ in range(3))
    for r in range(rounds):
        for kind in (list(LOADERS) if r % 2 == 0 else list(LOADERS)[::-1]):
            comm.barrier()
            started, cpu, waited = time.perf_counter(), time.process_time(), 0.0
            for _ in range(STEPS):
                before = time.perf_counter()
                x, y = next(feeds[kind])
                waited += time.perf_counter() - before
                replicas.zero_grad()
                replicas.reduced[-1] = train_step(model, criterion, x, y, 64)
                comm.allreduce(replicas.reduced)
                model.step(optimizer)
            elapsed = comm.allreduce_obj(time.perf_counter() - started, "max")
            rates[kind].append(STEPS * BATCH / elapsed)
            spent = comm.allreduce_obj(time.process_time() - cpu, "sum") / comm.size
            cpu_ms[kind].append(spent / STEPS * 1e3)
            wait_ms[kind].append(comm.allreduce_obj(waited, "max") / STEPS * 1e3)
    if comm.rank == 0:
        print(json.dumps(dict(rates=rates, cpu_ms=cpu_ms, wait_ms=wait_ms)))


def training_rows(data, rounds):
    cmd = [find_mpiexec(), "-n", "2", sys.executable, __file__, "--worker", "--rounds",
           str(rounds), "--data", data]
    out = subprocess.run(cmd, env=rank_env(), capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    got = json.loads(out.stdout.strip().splitlines()[-1])
    rates, cpu, wait = got["rates"], got["cpu_ms"], got["wait_ms"]
    return [(f"training, MNIST, 2 ranks, blocks of {STEPS} steps", rates["in-memory"],
             rates["streaming"]),
            ("training, CPU ms per step and rank (its loader thread's included)",
             cpu["in-memory"], cpu["streaming"]),
            ("training, ms per step waiting for the next batch (the slower rank)",
             wait["in-memory"], wait["streaming"])]


def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines()
                    if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def table(rows, rounds):
    print(f"CPU: {cpu_model()}; {rounds} rounds; images/s unless said, medians (min-max)\n")
    print("| case | in-memory | streaming | streaming / in-memory (median, min-max of rounds) |")
    print("| --- | ---: | ---: | ---: |")

    def cell(rates):
        if rates is None:
            return "-"
        digits = 0 if min(rates) >= 100 else 2
        return (f"{statistics.median(rates):,.{digits}f} "
                f"({min(rates):,.{digits}f}-{max(rates):,.{digits}f})")
    for name, base, new in rows:
        ratio = (f"{statistics.median(np.divide(new, base)):.3f}"
                 f" ({min(np.divide(new, base)):.3f}-{max(np.divide(new, base)):.3f})"
                 if base else "-")
        print(f"| {name} | {cell(base)} | {cell(new)} | {ratio} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--data", default="data/mnist.h5")
    parser.add_argument("--big", default="", help="a large file for the loader-only figure")
    parser.add_argument("--only", choices=["reads", "loader", "training"], default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.data, args.rounds)
    if args.only in (None, "reads"):
        for path in [args.data] + ([args.big] if args.big else []):
            print(f"reading random rows of {path}, us per row: " + ", ".join(
                f"{name} {spent:.1f}" for name, spent in read_rows(path, args.rounds).items()))
        if args.only:
            return
    rows = []
    if args.only != "training":
        rows += loader_rows(args.data, args.big, args.rounds)
    if args.only != "loader":
        rows += training_rows(args.data, args.rounds)
    table(rows, args.rounds)


if __name__ == "__main__":
    main()

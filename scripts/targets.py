"""ddl's training speed per CPU name that numba compiles for (native, the tuning's candidates,
its choice) against PyTorch's two layouts, interleaved in one run: ref-cnn and seed-cnn, batch
64, SGD with momentum, one thread. Each ddl contestant is a child process (`python -m
ddl.tuning`, as the tuning itself measures); PyTorch runs in this process; every round times each
contestant once, so the machine's noise hits all alike. Prints a markdown table of medians.

    python scripts/targets.py [--rounds 9] [--names haswell,znver4,...]
"""
import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from ddl import kernels, tuning  # noqa: E402
from ddl.kernels import tune  # noqa: E402
from ddl.models import build, to_torch  # noqa: E402


def torch_contestant(channels_last):
    """A function timing PyTorch's training step of each model: {model: seconds per image}."""
    import torch
    torch.set_num_threads(1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random((tuning.BATCH, 1, 28, 28), dtype=np.float32))
    x, y = x.contiguous(memory_format=fmt), torch.from_numpy(rng.integers(0, 10, tuning.BATCH))
    steps = {}
    for name in tuning.MODELS:
        model = to_torch(build(name, (1, 28, 28), 10, seed=0)).to(memory_format=fmt)
        optimizer = torch.optim.SGD(model.parameters(), 0.01, momentum=0.9)

        def step(model=model, optimizer=optimizer):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        step()
        started = time.perf_counter()
        step()
        steps[name] = (step, max(1, round(tuning.SECONDS / (time.perf_counter() - started))))

    def turn():
        seconds = {}
        for name, (step, count) in steps.items():
            started = time.perf_counter()
            for _ in range(count):
                step()
            seconds[name] = (time.perf_counter() - started) / (count * tuning.BATCH)
        return seconds
    return turn


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--names", help="CPU names to time (default: the tuning's candidates)")
    args = parser.parse_args()
    explicit = os.environ.get(tune.EXPLICIT)
    chosen = kernels.target()           # tunes now if this CPU and version have no choice yet
    host = tune.candidates()[0]
    wanted = args.names.split(",") if args.names else tune.candidates()
    names = list(dict.fromkeys([host, *wanted, chosen]))   # native first, each name once
    extra = {}
    try:
        extra = {"PyTorch": torch_contestant(False),
                 "PyTorch channels_last": torch_contestant(True)}
    except ImportError:
        print("PyTorch is not installed (make install-torch): ddl only")
    measured = tune.measure(names, args.rounds, extra)
    print(f"CPU: {tune.cpu_key()}; ddl's choice: {chosen}"
          + (f" (explicit ${tune.EXPLICIT}={explicit})" if explicit else "")
          + f"; medians of {args.rounds} interleaved rounds, images/s\n")
    torch_best = {m: min(measured[k][m] for k in extra) for m in tuning.MODELS} if extra else {}
    header = "| contestant | " + " | ".join(
        f"{m} | vs native" + (" | vs PyTorch's best" if extra else "") for m in tuning.MODELS)
    print(header + " |\n" + "|---" * header.count("|") + "|")
    for name, times in measured.items():
        label = name + (" (native)" if name == host else "") + (" (choice)" if name == chosen
                                                               else "")
        cells = []
        for m in tuning.MODELS:
            cells += [f"{1 / times[m]:,.0f}", f"{measured[host][m] / times[m]:.2f}x"]
            if extra:
                cells.append(f"{torch_best[m] / times[m]:.2f}x")
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

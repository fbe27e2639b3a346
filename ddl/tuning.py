"""The measurement behind ddl/kernels/tune.py: one child process per candidate CPU name (in
$NUMBA_CPU_NAME), timing the training steps of ref-cnn, seed-cnn and resnet-mini (batch 64, SGD
with momentum, as `ddl train` runs them): the two demo networks' kernels, and the BatchNorm,
residual and strided ones of a network as users build them.

It compiles every kernel, as `kernels.warm` does, so that the chosen candidate's cache folder is
ready for the runs after it (compiling only what the steps use costs as much: numba files lazily
compiled code under other keys), and prints "{}" when ready; then, for each line "time" on
stdin, prints {model: seconds per image} over about 0.1 s of steps per model. It lives outside
ddl/kernels because it builds models, and the kernels never import ddl.nn.
"""
import json
import sys
import time

import numpy as np

from ddl import kernels, nn
from ddl.models import build
from ddl.optim import SGD
from ddl.step import train_step

MODELS = ("ref-cnn", "seed-cnn", "resnet-mini")
BATCH = 64
SECONDS = 0.1


def training_step(name):
    """A closure running one training step of model `name` on a fixed MNIST-shaped batch."""
    model = build(name, (1, 28, 28), 10, seed=0, input_grad=False)
    optimizer = SGD(model.parameters(), 0.01, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    rng = np.random.default_rng(0)
    x, y = rng.random((BATCH, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, BATCH)

    def step():
        model.zero_grad()
        train_step(model, criterion, x, y, BATCH)
        model.step(optimizer)
    return step


def main():
    kernels.setup()
    kernels.use("numba")
    kernels.warm()
    steps = {name: training_step(name) for name in MODELS}
    counts = {}
    for name, step in steps.items():
        step()                                       # compiles
        started = time.perf_counter()
        step()
        counts[name] = max(1, round(SECONDS / (time.perf_counter() - started)))
    print("{}", flush=True)
    for line in sys.stdin:
        if line.strip() != "time":
            break
        seconds = {}
        for name, step in steps.items():
            started = time.perf_counter()
            for _ in range(counts[name]):
                step()
            seconds[name] = (time.perf_counter() - started) / (counts[name] * BATCH)
        print(json.dumps(seconds), flush=True)


if __name__ == "__main__":
    main()

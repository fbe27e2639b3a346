"""One training step's work on a rank: forward and backward in micro-batches, and the dropout
masks that make it repeatable at any step (`train.py` runs the step; `Replicas` averages it).
"""
import contextlib

import numpy as np

from ddl.nn import Dropout
from ddl.timeline import Off

OFF = Off()         # the timeline of a step that records none


def micro_batches(x, y, size):
    """(x, y) in slices of `size` images (0: whole). Small slices keep a step's activations in
    cache (docs/measured.md has the measurements)."""
    size = size or len(y)
    return ((x[i:i + size], y[i:i + size]) for i in range(0, len(y), size))


def train_step(model, criterion, x, y, micro_batch, timeline=OFF, last=contextlib.nullcontext):
    """Forward and backward of one local batch (x (b, C, H, W), y (b,)) in micro-batches; adds the
    gradients of the batch's mean loss into every p.grad and returns that loss; `timeline`
    records each pass. `last()` is a context entered around the last micro-batch's backward,
    the one that completes the gradients (Replicas.overlapping: their exchange starts there).

    The model's buffers (BatchNorm's running statistics) move as if the micro-batches were ranks
    (see Replicas.average_buffers): each starts from the buffers the step found, and the step
    ends with the mean of what they made. The running statistics, averages that each batch moves
    linearly, thus come out as on N ranks whose micro-batches are these, with no dependence on
    their order."""
    slices = list(micro_batches(x, y, micro_batch))
    buffers = [b for _, b in model.named_buffers()] if len(slices) > 1 else []
    start = [b.copy() for b in buffers]
    total = [np.zeros(b.shape) for b in buffers]
    loss = 0.0
    for i, (xs, ys) in enumerate(slices, 1):
        for b, b0 in zip(buffers, start):
            b[...] = b0
        share = len(ys) / len(y)                   # the slices' gradients add up to the mean's
        loss += share * criterion(model.forward(xs), ys)
        timeline.lap("forward")
        with last() if i == len(slices) else contextlib.nullcontext():
            model.backward(criterion.backward() * np.float32(share))
        timeline.lap("backward")
        for t, b in zip(total, buffers):
            t += b
    for b, t in zip(buffers, total):
        b[...] = t / len(slices) if b.dtype.kind == "f" else np.rint(t / len(slices))
    return loss


def rehearse(model, image_shape, batch, micro_batch):
    """One forward and backward of `model` in training mode, on blank images of `image_shape`
    (C, H, W), for each micro-batch size that a step of `batch` images runs: the convolutions of
    training, which kernels.choose plans for. The model is left as it was: its parameters and
    BatchNorm statistics restored, its gradients zero."""
    state = model.state_dict()
    model.train()
    try:
        sizes = {len(ys) for _, ys in micro_batches(range(batch), range(batch), micro_batch)}
        for n in sorted(sizes, reverse=True):
            y = model.forward(np.zeros((n, *image_shape), np.float32))
            model.backward(np.ones(y.shape, y.dtype))
    finally:
        model.load_state_dict(state)
        model.zero_grad()


def dropout_layers(model):
    """[(index, layer)] of the model's Dropout layers, for `seed_dropout`."""
    return [(i, m) for i, m in enumerate(model.modules()) if isinstance(m, Dropout)]


def seed_dropout(layers, seed, epoch, step, rank):
    """Dropout masks from (seed, epoch, step, rank, layer): different on every rank, the same
    again when a run resumes at any step, with no generator state to save. `layers`: from
    `dropout_layers`."""
    for i, m in layers:
        m.rng = np.random.default_rng((seed, epoch, step, rank, i))

"""Evaluation: a checkpoint's model restored on every rank, a data split checked against it, and
the exact test loss and accuracy over every rank's share (`ddl train` at each epoch's end, `ddl
evaluate`, `ddl predict`).
"""
import contextlib

import numpy as np

from ddl import checkpoint, identity
from ddl.comm import agree
from ddl.data import DistributedSampler, H5Dataset, Loader
from ddl.errors import CheckpointError, DataError, dims, one_line
from ddl.models import build
from ddl.nn import CrossEntropyLoss
from ddl.step import micro_batches

EVAL_BATCH = 1000   # per rank and read: evaluation has no gradients, so bigger reads save overhead
# ... but a forward pass over 128 images stays in cache, which passes of 1,000 do not.
EVAL_MICRO_BATCH = 128


def open_split(path, split, expect=None):
    """One split of the data file. `expect`, (in_shape, num_classes, who): refused (DataError)
    unless its images and classes are those, e.g. ((1, 28, 28), 10, "'train' holds")."""
    data = H5Dataset(path, split)
    if expect and (data.image_shape, data.num_classes) != (tuple(expect[0]), expect[1]):
        data.close()
        raise DataError(f"{path}: '{split}' holds {dims(data.image_shape)} images of "
                        f"{data.num_classes} classes, but {expect[2]} {dims(expect[0])} images "
                        f"of {expect[1]} classes")
    return data


@contextlib.contextmanager
def reading(path):
    """Around loading the states of checkpoint `path`: whatever a state that does not fit makes
    the loaders raise becomes one line naming the file."""
    try:
        yield
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: damaged checkpoint ({one_line(e)})") from None


def evaluate(model, loader, comm, confusion=None):
    """Exact test loss and accuracy over every rank's part: sums are all-reduced, not means.
    `confusion`, a float64 (K, K) array of zeros if given, gets the counts of every (label,
    predicted class) pair (row: the label), over every rank's part. Leaves the model in eval mode
    (the training loop sets train mode at each epoch)."""
    model.eval()
    criterion = CrossEntropyLoss(reduction="sum")
    k = 0 if confusion is None else len(confusion)
    totals = np.zeros(3 + k * k)               # loss sum, correct, count; the confusion counts
    for x, y in loader:
        for xs, ys in micro_batches(x, y, EVAL_MICRO_BATCH):
            logits = model(xs)
            predicted = logits.argmax(1)
            totals[:3] += (criterion(logits, ys), np.count_nonzero(predicted == ys), len(ys))
            if k:
                np.add.at(totals[3:], ys * k + predicted, 1)
    comm.allreduce(totals, what="evaluation's all-reduce")
    if k:
        confusion[...] = totals[3:].reshape(k, k)
    return totals[0] / totals[2], totals[1] / totals[2]


def restore(path, comm):
    """The model saved in checkpoint `path`, rebuilt from what the checkpoint records of it (rank
    0 reads it, every rank gets it), the tree, and what the model takes: (in_shape, num_classes,
    who) for `open_split`."""
    state = comm.bcast_obj(agree(comm, lambda: checkpoint.load(path) if comm.rank == 0 else None,
                                 "checkpoint read"), what="broadcast of the checkpoint")
    with reading(path):
        arch = state["architecture"]
        name, in_shape, classes = arch["model"], tuple(arch["in_shape"]), int(arch["num_classes"])

    def rebuild():
        model = build(name, in_shape, classes)   # a user's model file may be gone: ModelError
        with reading(path):
            model.load_state_dict(state["model"])
        return model
    return agree(comm, rebuild), state, (in_shape, classes, f"the model in {path} takes")


def checked_split(data, state, takes, path, other=False):
    """The test split of data file `data` (None: the one that checkpoint `path`, whose tree is
    `state`, was trained on), refused (DataError, one line) unless it fits the model (`takes`,
    from `restore`) and is the checkpoint's data set: the same class numbering always, the same
    labels and images unless `other` (see ddl/identity.py)."""
    data = data or state["data"]["path"]
    test = open_split(data, "test", takes)
    try:
        with H5Dataset(data, "train") as train:
            identity.check(state["data"], identity.data_identity(data, train, test), path, other)
    except BaseException:
        test.close()
        raise
    return test


def eval_loader(dataset, comm):
    sampler = DistributedSampler(dataset.n, comm.size, comm.rank, EVAL_BATCH * comm.size,
                                 shuffle=False, drop_last=False)
    return Loader(dataset, sampler)

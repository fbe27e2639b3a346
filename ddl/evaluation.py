"""Evaluation: a checkpoint's model restored on every rank, a data split checked against it, and
the exact test loss and accuracy over every rank's share (`ddl train` at each epoch's end, `ddl
evaluate`, `ddl predict`).
"""
import contextlib

import numpy as np

from ddl import checkpoint, identity
from ddl.comm import agree
from ddl.data import MAX_CLASSES, DistributedSampler, H5Dataset, Loader
from ddl.errors import CheckpointError, DataError, ModelError, dims, one_line
from ddl.models import build, changed_file, trusted
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
def reading(path, architecture=None):
    """Around loading the states of checkpoint `path`: whatever a state that does not fit makes
    the loaders raise becomes one line naming the file, or the model file (of the checkpoint's
    `architecture`) that was edited since the checkpoint was saved."""
    try:
        yield
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        changed = changed_file(architecture) if isinstance(architecture, dict) else None
        if changed:
            raise CheckpointError(f"{changed} changed since {path} was saved, and the saved "
                                  f"weights no longer fit its model ({one_line(e)}): restore "
                                  f"the file, or start a new run") from None
        raise CheckpointError(f"{path}: damaged checkpoint ({one_line(e)})") from None


class EvaluationStopped(Exception):
    """A stop signal came during `evaluate` (on any rank: every rank raises it together)."""


def evaluate(model, loader, comm, stop=None, confusion=None):
    """Exact test loss and accuracy over every rank's part: sums are all-reduced, not means.
    Leaves the model in eval mode (the training loop sets train mode at each epoch). `stop`, a
    StopRequest: a signal that any rank receives ends every rank's evaluation at its next batch
    (EvaluationStopped), so that a stop takes a batch, not a whole test set. `confusion`, a
    float64 (K, K) array of zeros if given, gets the counts of every (label, predicted class)
    pair (row: the label), over every rank's part."""
    model.eval()
    criterion = CrossEntropyLoss(reduction="sum")
    k = 0 if confusion is None else len(confusion)
    # loss sum, correct, count, ranks stopped; then the confusion counts
    totals = np.zeros(4 + k * k)
    for x, y in loader:
        if stop is not None and stop.signum:
            totals[3] = 1
            break
        for xs, ys in micro_batches(x, y, EVAL_MICRO_BATCH):
            logits = model(xs)
            predicted = logits.argmax(1)
            totals[:3] += (criterion(logits, ys), np.count_nonzero(predicted == ys), len(ys))
            if k:
                np.add.at(totals[4:], ys * k + predicted, 1)
    comm.allreduce(totals, what="evaluation's all-reduce")
    if totals[3]:
        raise EvaluationStopped()
    if k:
        confusion[...] = totals[4:].reshape(k, k)
    return totals[0] / totals[2], totals[1] / totals[2]


def restore(path, comm, given=None, trust=False):
    """The model saved in checkpoint `path`, rebuilt from what the checkpoint records of it (rank
    0 reads it, every rank gets it), the tree, and what the model takes: (in_shape, num_classes,
    who) for `open_split`. A model file runs only if the user names it (`given`, their --model)
    or trusts the checkpoint (`trust`, --trust-model): see models.trusted."""
    state = comm.bcast_obj(agree(comm, lambda: checkpoint.load(path) if comm.rank == 0 else None,
                                 "checkpoint read"), what="broadcast of the checkpoint")
    with reading(path):
        arch = state["architecture"]
        name, in_shape, classes = arch["model"], tuple(arch["in_shape"]), int(arch["num_classes"])
        if not (len(in_shape) == 3 and all(isinstance(v, int) and v > 0 for v in in_shape)
                and 2 <= classes <= MAX_CLASSES):          # before they size a model
            raise ValueError(f"architecture {in_shape} images of {classes} classes")

    def rebuild():
        try:
            model = build(trusted(name, given, trust, path), in_shape, classes)
        except ModelError as e:         # a file gone, or edited so that it builds no longer
            changed = not given and changed_file(arch)
            if changed:
                raise ModelError(f"{changed} changed since {path} was saved: {e}") from None
            raise
        with reading(path, arch):
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

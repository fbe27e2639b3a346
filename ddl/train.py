"""The training loop, top to bottom: check, set up, (resume), epochs, evaluation, checkpoints.

Every rank runs this same code. The distributed part is set up once (the communicator, the
replicas' flat gradient buffer, the sampler's shard); from then on a world of one and a world of
N differ only inside those objects. A run can stop after any step (SIGTERM, SIGINT) and resume
there: the checkpoint records the step, and every random stream derives from (seed, epoch, step).
"""
import contextlib
import dataclasses
import math
import os
import signal
import time

import numpy as np

from ddl import checkpoint, kernels
from ddl.atomic import check_outputs, remove_leftovers
from ddl.comm import SingleCommunicator
from ddl.data import DistributedSampler, H5Dataset, Loader
from ddl.errors import (CheckpointError, DataError, DDLError, Diverged, Hung, Stopped,
                        UsageError, dims, one_line)
from ddl.models import build, check_name, resolve
from ddl.nn import CrossEntropyLoss, Dropout
from ddl.log import Log
from ddl.optim import OPTIMIZERS, make_optimizer
from ddl.preemption import StopRequest
from ddl.schedules import SCHEDULES, make_schedule
from ddl.parallel import Replicas
from ddl.timeline import Off, Timeline
from ddl.watchdog import DEFAULT_TIMEOUT

OFF = Off()         # the timeline of a step that records none

EVAL_BATCH = 1000   # per rank and read: evaluation has no gradients, so bigger reads save overhead
# ... but a forward pass over 128 images stays in cache, which passes of 1,000 do not.
EVAL_MICRO_BATCH = 128
OUTPUTS = ("checkpoint", "metrics", "plot", "timeline")
# What --resume may not change: the run's identity, which its weights, optimizer state and random
# streams belong to (the data set too, compared by content). What it ignores: where files go, what
# is shown, and when to save or give up. Any other change (epochs, lr, schedule, ...) it applies
# from the checkpoint's iteration on, and says so; the README lists both.
FIXED = ("model", "optimizer", "momentum", "batch_size", "seed", "subset")
IGNORED = ("data", "resume", "overwrite", "quiet", "debug", "timeout", "checkpoint_every",
           "checkpoint_seconds") + OUTPUTS


@dataclasses.dataclass
class Config:
    """Options of `ddl train`; the defaults are the tuned recipe for MNIST (what each choice buys,
    measured, is in the README's "The recipe")."""
    model: str = "seed-cnn"        # a name in ddl.models.MODELS, or a user's FILE.py:FUNCTION
    epochs: int = 7
    batch_size: int = 128          # global: split evenly across the ranks
    micro_batch: int = 64          # images per forward/backward within a rank's batch (0: all)
    kernels: str = "numba"         # or "numpy", the reference (ddl/kernels/__init__.py)
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup: int = 0                # iterations of linear lr warm-up (large global batches)
    seed: int = 0
    data: str = "data/mnist.h5"
    subset: int = 0                # train on the first `subset` training images (0: all)
    shift: int = 1                 # augmentation: move training images up to this many pixels
    flip: bool = False             # augmentation: mirror half the training images left to right
    checkpoint: str = ""
    checkpoint_every: int = 0      # also save every this many steps (0: at epoch ends only)
    checkpoint_seconds: float = 0  # also save when this long has passed since the last save
    resume: bool = False           # (with no checkpoint yet: start afresh)
    overwrite: bool = False        # replace an existing checkpoint, metrics file, plot or timeline
    metrics: str = ""
    plot: str = ""
    timeline: str = ""             # Chrome trace of every rank's phases (ddl/timeline.py)
    timeout: float = DEFAULT_TIMEOUT   # seconds a rank may wait in a collective (0: for ever)
    quiet: bool = False
    debug: bool = False


def _flag(name):
    return f"--{name.replace('_', '-')}"


def check_options(cfg, world_size):
    """Raise UsageError for a problem visible from the options alone (no I/O)."""
    check_name(cfg.model)
    for name, known in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES),
                        ("kernels", kernels.NAMES)):
        value = getattr(cfg, name)
        if value not in known:
            raise UsageError(f"unknown {name} {value!r} (choose from {', '.join(known)})")
    # Zero means "off" or "all" for the micro-batch, warm-up, subset, shift and checkpoint
    # interval.
    for name, low in (("epochs", 1), ("batch_size", 1), ("micro_batch", 0), ("warmup", 0),
                      ("subset", 0), ("seed", 0), ("shift", 0), ("checkpoint_every", 0)):
        value = getattr(cfg, name)
        if value < low:
            raise UsageError(f"{_flag(name)} must be at least {low}, got {value}")
    # What PyTorch's optimizers refuse, and NaN or inf besides, which would spoil every weight.
    for name, low in (("lr", "> 0"), ("momentum", ">= 0"), ("weight_decay", ">= 0"),
                      ("timeout", ">= 0"), ("checkpoint_seconds", ">= 0")):
        value = getattr(cfg, name)
        if not (math.isfinite(value) and (value > 0 if low == "> 0" else value >= 0)):
            raise UsageError(f"{_flag(name)} must be a finite number {low}, got {value}")
    if cfg.batch_size % world_size:
        raise UsageError(f"--batch-size {cfg.batch_size} (the global batch) does not divide by "
                         f"the {world_size} ranks")
    for name in ("resume", "checkpoint_every", "checkpoint_seconds"):
        if getattr(cfg, name) and not cfg.checkpoint:
            raise UsageError(f"{_flag(name)} needs --checkpoint PATH")
    if cfg.resume and cfg.overwrite:
        raise UsageError("--resume continues the checkpoint and --overwrite replaces it: "
                         "choose one")


def claim_outputs(cfg):
    """Rank 0's checks of the output paths (none is the data file or another output; each can be
    written), then the checkpoint's lock: returned held, for a `with` around the run. Temporary
    files that a killed job left beside the outputs go."""
    outputs = [(_flag(name), getattr(cfg, name)) for name in OUTPUTS if getattr(cfg, name)]
    check_outputs(outputs, [("--data", cfg.data)])
    if cfg.plot:
        from ddl.plots import check_format
        check_format(cfg.plot, "--plot")
    lock = checkpoint.Lock(cfg.checkpoint) if cfg.checkpoint else contextlib.nullcontext()
    for _, path in outputs:
        remove_leftovers(path)
    return lock


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


def data_identity(train, test):
    """What makes two data files the same data set, wherever they live: sizes, image shape, and
    the pixel statistics that `ddl prepare` computed from every training image."""
    return dict(train=train.n, test=test.n, classes=train.num_classes,
                shape=list(train.image_shape), mean=train.mean.tolist(), std=train.std.tolist())


def check_inputs(cfg, comm):
    """Open the data and check it against the model; on rank 0 (which alone writes and reads
    checkpoints, and holds the checkpoint's lock by now) check that no earlier output would be
    lost and read the checkpoint to resume. Returns (train set, test set, images used, resume
    state or None, what the resume changes: a list of words for the log); raises UsageError."""
    train = open_split(cfg.data, "train")
    test = open_split(cfg.data, "test", (train.image_shape, train.num_classes, "'train' holds"))
    n = min(cfg.subset or train.n, train.n)
    if cfg.batch_size > n:
        raise UsageError(f"--batch-size {cfg.batch_size} is larger than the {n} training images")
    state, changes = None, []
    if comm.rank == 0 and cfg.resume and os.path.lexists(cfg.checkpoint):
        state = checkpoint.load(cfg.checkpoint)
        changes = resume_changes(cfg, state, data_identity(train, test), comm.size)
    elif comm.rank == 0 and not (cfg.overwrite or cfg.resume):
        # (--resume with no checkpoint yet starts a new run, which a restart loop relies on: its
        # other outputs are that run's, rewritten from the history it keeps)
        for name in OUTPUTS:
            path = getattr(cfg, name)
            if path and os.path.exists(path):
                go_on = ("--resume to continue that run" if name == "checkpoint" else
                         f"--resume to go on with the run in {cfg.checkpoint}"
                         if cfg.checkpoint else "")
                raise UsageError(f"{_flag(name)} {path} already exists: pass "
                                 f"{go_on + ' or ' if go_on else ''}--overwrite to replace it")
    return train, test, n, state, changes


def resume_changes(cfg, state, data_id, world_size):
    """Compare the checkpoint's run with `cfg` (see FIXED): raise CheckpointError naming every
    option that may not change, or fewer epochs than are done; return the applied changes."""
    saved, path = state["config"], cfg.checkpoint
    fixed = [f"{_flag(name)} ({saved.get(name)} -> {getattr(cfg, name)})" for name in FIXED
             if saved.get(name) != getattr(cfg, name)]
    if state["data"] != data_id:
        fixed.append(f"--data (another data set than {saved.get('data')})")
    if fixed:
        raise CheckpointError(f"{path}: --resume cannot change {', '.join(fixed)}: give the "
                              f"run's own options, or start a new run with --overwrite")
    done, steps = int(state["epoch"]), int(state["step"])
    if cfg.epochs < done + (steps > 0):
        trained = f"{done} epochs" + (f" and {steps} steps" if steps else "")
        raise CheckpointError(f"{path} has already trained {trained}: --epochs must be at least "
                              f"{done + (steps > 0)}, got {cfg.epochs}")
    # (checkpoint.load fills in what a format 1 run did without the options that came later)
    changes = [f"{_flag(f.name)} {getattr(cfg, f.name)} (was {saved.get(f.name, f.default)})"
               for f in dataclasses.fields(cfg) if f.name not in FIXED + IGNORED
               and saved.get(f.name, f.default) != getattr(cfg, f.name)]
    if int(state["world_size"]) != world_size:
        changes.append(f"{world_size} rank(s) (was {state['world_size']})")
    return changes


def agree(comm, fn, what="check that every rank succeeded"):
    """`fn()` on every rank; a DDLError on any rank is raised on every rank (rank 0's, else the
    first failing rank's, named), so all stop together and none waits in a collective for one
    that left. `what` names the collective that follows `fn` (for the watchdog: "rank 0 did not
    reach the checkpoint write ...")."""
    try:
        result, problem = fn(), None
    except Hung:                    # this rank ends the job now: no collective can complete
        raise
    except DDLError as e:
        result, problem = None, (type(e), str(e))
    problems = [(r, p) for r, p in enumerate(comm.allgather_obj(problem, what)) if p]
    if problems:
        r, (kind, message) = problems[0]
        raise kind(message if r == 0 else f"rank {r}: {message}", everywhere=True)
    return result


@contextlib.contextmanager
def reading(path):
    """Around loading the states of checkpoint `path`: whatever a state that does not fit makes
    the loaders raise becomes one line naming the file."""
    try:
        yield
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: damaged checkpoint ({one_line(e)})") from None


def load_resumed(cfg, state, model, optimizer, schedule):
    """Load the checkpoint's states. What --resume may change comes from `cfg`, not from the
    checkpoint: the weight decay, and the lr on which the schedule (rebuilt for the epochs) goes
    on from the saved iteration."""
    with reading(cfg.checkpoint):
        model.load_state_dict(state["model"])
        saved = state["optimizer"]
        optimizer.load_state_dict(dict(saved, hyper=dict(saved["hyper"],
                                                         weight_decay=cfg.weight_decay)))
        schedule.load_state_dict(dict(state["schedule"], base_lr=cfg.lr))


def evaluate(model, loader, comm):
    """Exact test loss and accuracy over every rank's part: sums are all-reduced, not means.
    Leaves the model in eval mode (the training loop sets train mode at each epoch)."""
    model.eval()
    criterion = CrossEntropyLoss(reduction="sum")
    totals = np.zeros(3)                       # loss sum, correct, count
    for x, y in loader:
        for xs, ys in micro_batches(x, y, EVAL_MICRO_BATCH):
            logits = model(xs)
            totals += (criterion(logits, ys), np.count_nonzero(logits.argmax(1) == ys), len(ys))
    comm.allreduce(totals, what="evaluation's all-reduce")
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


def eval_loader(dataset, comm):
    sampler = DistributedSampler(dataset.n, comm.size, comm.rank, EVAL_BATCH * comm.size,
                                 shuffle=False, drop_last=False)
    return Loader(dataset, sampler)


class FiniteCheck:
    """--debug: hooks on every module of `model` (see Module.add_hook) that stop training at the
    first module whose output, or whose own parameters' gradient, is not finite, naming it by its
    state_dict prefix, and where training is (`where`, which the loop sets at each step): a
    Diverged error of this rank alone. Innermost modules finish first, so they are named first."""

    def __init__(self, model):
        self.where = None
        self.names = {id(m): name or "(the model)" for name, m in model.named_modules()}
        model.add_hook(self)

    def __call__(self, module, direction, out):
        what = f"{type(module).__name__}({module.extra_repr()})"
        if out is not None and not np.isfinite(out).all():
            raise Diverged(f"training diverged at {self.where}: {direction} of layer "
                           f"{self.names[id(module)]} ({what}) produced "
                           f"{'NaN' if np.isnan(out).any() else 'inf'}")
        for name, p in module.named_parameters():
            if direction == "backward" and "." not in name and not np.isfinite(p.grad).all():
                raise Diverged(f"training diverged at {self.where}: gradient of layer "
                               f"{self.names[id(module)]} ({what}) parameter {name} is not "
                               f"finite")


def micro_batches(x, y, size):
    """(x, y) in slices of `size` images (0: whole). Small slices keep a step's activations in
    cache (the README's Speed section has the measurements)."""
    size = size or len(y)
    return ((x[i:i + size], y[i:i + size]) for i in range(0, len(y), size))


def train_step(model, criterion, x, y, micro_batch, timeline=OFF):
    """Forward and backward of one local batch (x (b, C, H, W), y (b,)) in micro-batches; adds the
    gradients of the batch's mean loss into every p.grad and returns that loss; `timeline`
    records each pass.

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
    for xs, ys in slices:
        for b, b0 in zip(buffers, start):
            b[...] = b0
        share = len(ys) / len(y)                   # the slices' gradients add up to the mean's
        loss += share * criterion(model.forward(xs), ys)
        timeline.lap("forward")
        model.backward(criterion.backward() * np.float32(share))
        timeline.lap("backward")
        for t, b in zip(total, buffers):
            t += b
    for b, t in zip(buffers, total):
        b[...] = t / len(slices) if b.dtype.kind == "f" else np.rint(t / len(slices))
    return loss


def dropout_layers(model):
    """[(index, layer)] of the model's Dropout layers, for `seed_dropout`."""
    return [(i, m) for i, m in enumerate(model.modules()) if isinstance(m, Dropout)]


def seed_dropout(layers, seed, epoch, step, rank):
    """Dropout masks from (seed, epoch, step, rank, layer): different on every rank, the same
    again when a run resumes at any step, with no generator state to save. `layers`: from
    `dropout_layers`."""
    for i, m in layers:
        m.rng = np.random.default_rng((seed, epoch, step, rank, i))


def run(cfg, comm=None, on_epoch_end=None):
    """Train with `cfg` on every rank of `comm`; returns (history, model), history holding one
    dict per epoch. `on_epoch_end(epoch, model)` runs after each epoch's checkpoint. A bad option
    or input, a run that diverges, an output that cannot be written and a stop by SIGTERM or
    SIGINT raise a DDLError on every rank together; a rank that does not reach a collective
    within --timeout, Hung on one (see ddl/errors.py)."""
    comm = comm or SingleCommunicator()
    comm.timeout, comm.where = cfg.timeout, "at start-up"
    agree(comm, lambda: check_options(cfg, comm.size), "option check")
    cfg = dataclasses.replace(cfg, model=resolve(cfg.model))  # a model file's path, made absolute
    # Rank 0 holds the checkpoint's lock to the end, so that no second job writes it meanwhile.
    # NumPy's warnings about NaN and inf stay quiet: the loop checks for those itself.
    with agree(comm, lambda: claim_outputs(cfg) if comm.rank == 0 else contextlib.nullcontext(),
               "output check"), np.errstate(all="ignore"):
        return _train(cfg, comm, on_epoch_end)


def _position(epoch, step):
    """Where a run is after `step` steps of epoch `epoch` + 1, in words ("epoch 2": its end)."""
    return f"epoch {epoch + 1}, step {step}" if step else f"epoch {epoch}"


def _diverged(cfg, where, saved, what="the loss or a gradient"):
    """The error for a run whose `what` turned NaN or inf at `where`; `saved`: where the
    checkpoint is (`_position`; "" for none yet)."""
    kept = (f"; {cfg.checkpoint} keeps {saved}" if cfg.checkpoint and saved else
            f"; {cfg.checkpoint} was not written" if cfg.checkpoint else "")
    return Diverged(f"training diverged at {where}: {what} turned NaN or inf{kept} (lower --lr, "
                    f"or find the layer with --debug)", everywhere=True)


def _train(cfg, comm, on_epoch_end):
    rank0 = comm.rank == 0
    log = Log(rank0 and not cfg.quiet, cfg.metrics if rank0 else None)

    train_set, test_set, n_train, state, changes = agree(comm, lambda: check_inputs(cfg, comm),
                                                         "input check")
    kernels.use(cfg.kernels)
    compile_seconds = kernels.warm(comm)   # before any model runs, so rank 0 compiles first
    # The model fits the data: its images and classes, recorded in the checkpoint to rebuild it.
    architecture = dict(model=cfg.model, in_shape=list(train_set.image_shape),
                        num_classes=train_set.num_classes)
    model = agree(comm, lambda: build(cfg.model, train_set.image_shape, train_set.num_classes,
                                      seed=cfg.seed, input_grad=False))

    # --- set up: the same model, optimizer and schedule on every rank
    sampler = DistributedSampler(n_train, comm.size, comm.rank, cfg.batch_size, seed=cfg.seed)
    loader = Loader(train_set, sampler, shift=cfg.shift, flip=cfg.flip)
    test_loader = eval_loader(test_set, comm)
    steps = len(loader)
    finite_check = FiniteCheck(model) if cfg.debug else None
    replicas = Replicas(model, comm, flags=2)      # the flags: stop now, save now
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.momentum,
                               cfg.weight_decay)
    schedule = make_schedule(cfg.schedule, optimizer, cfg.epochs, steps, cfg.warmup)
    criterion = CrossEntropyLoss()
    dropouts = dropout_layers(model)
    data_id = data_identity(train_set, test_set)
    # Where the run starts: `start` epochs done and `first` steps of the next, with that epoch's
    # sums so far.
    start, first, partial, history = 0, 0, dict(loss_sum=0.0, seconds=0.0), []
    if cfg.resume:
        state = comm.bcast_obj(state, what="broadcast of the checkpoint")  # rank 0 read it
    if state is None and cfg.resume:
        log.info(f"no checkpoint {cfg.checkpoint} yet: starting a new run")
    elif state is not None:
        agree(comm, lambda: load_resumed(cfg, state, model, optimizer, schedule),
              "checkpoint load")
        start, first, partial = int(state["epoch"]), int(state["step"]), state["partial"]
        history = list(state["history"])
        log.info(f"resuming {cfg.checkpoint} " + (f"at epoch {start + 1}, step {first} of {steps}"
                                                  if first else f"after epoch {start}")
                 + "".join(f", {change}" for change in changes)
                 + (": nothing left to train (raise --epochs to go on)"
                    if start == cfg.epochs else ""))
    log.info(f"{cfg.model} for {dims(train_set.image_shape)} images of "
             f"{train_set.num_classes} classes: {replicas.data.size:,} parameters on "
             f"{comm.size} rank(s); global batch {cfg.batch_size} = {cfg.batch_size // comm.size} "
             f"per rank; {steps} steps per epoch over {n_train:,} images; {cfg.optimizer} lr "
             f"{cfg.lr}, {cfg.schedule} schedule; {cfg.kernels} kernels"
             + (f" (ready in {compile_seconds:.1f} s)" if cfg.kernels == "numba" else ""))

    def save(epoch, step, partial):
        """Rank 0 writes the checkpoint after `step` steps of epoch `epoch` + 1 (0: after epoch
        `epoch`), and every rank hears whether it could: a full disk ends the whole job with one
        line, the previous file kept."""
        agree(comm, lambda: rank0 and checkpoint.save(cfg.checkpoint, dict(
            model=model.state_dict(), architecture=architecture,
            optimizer=optimizer.state_dict(),
            schedule=schedule.state_dict(), epoch=epoch, step=step, partial=partial,
            history=history, config=dataclasses.asdict(cfg), data=data_id,
            world_size=comm.size)), "checkpoint write")

    def finish_timeline():
        """Rank 0 writes the timeline and shows its summary."""
        if cfg.timeline:
            lines = agree(comm, lambda: timeline.write(comm, cfg.timeline, start * steps + first),
                          "timeline write")
            for line in lines:
                log.info(line)

    # --- epochs
    saved = _position(start, first) if state is not None else ""
    done = start * steps + first                 # steps taken since the run began
    timeline = Timeline(comm) if cfg.timeline else OFF
    last_save = time.monotonic()
    with StopRequest() as stop:
        for epoch in range(start, cfg.epochs):
            begin = first if epoch == start else 0
            loader.set_epoch(epoch, begin)
            model.train()
            # A resumed epoch's figures count the steps before the stop too.
            loss_sum, before = (partial["loss_sum"], partial["seconds"]) if begin else (0.0, 0.0)
            started = time.perf_counter()
            for step, (x, y) in enumerate(loader, begin + 1):
                timeline.lap("data")
                done += 1
                comm.where, where = f"of step {done:,}", _position(epoch, step)
                if finite_check:
                    finite_check.where = where
                seed_dropout(dropouts, cfg.seed, epoch, step, comm.rank)
                replicas.zero_grad()
                loss = train_step(model, criterion, x, y, cfg.micro_batch, timeline)
                timeline.sync(comm)
                # The global batch's loss, or NaN on every rank if any rank's loss or gradient is
                # not finite: then stop before the optimizer spreads it into the weights. With it
                # travel a SIGTERM or SIGINT that any rank received, and rank 0's clock saying a
                # checkpoint is due, so that every rank acts on them after the same step.
                due = (rank0 and cfg.checkpoint_seconds > 0
                       and time.monotonic() - last_save >= cfg.checkpoint_seconds)
                loss, (stopping, due) = replicas.allreduce_grads(loss, stop.signum > 0, due)
                timeline.lap("all-reduce")
                if math.isnan(loss):
                    raise _diverged(cfg, where, saved)
                model.step(optimizer)
                schedule.step()
                timeline.lap("optimizer")
                loss_sum += loss
                elapsed = time.perf_counter() - started
                log.progress(epoch + 1, cfg.epochs, step, steps, loss,
                             (step - begin) * cfg.batch_size / elapsed)
                due = due or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0)
                # The epoch's own checkpoint follows its last step within seconds.
                if cfg.checkpoint and (stopping or (due and step < steps)):
                    save(epoch, step, dict(loss_sum=loss_sum, seconds=before + elapsed))
                    saved, last_save = where, time.monotonic()
                    timeline.lap("checkpoint")
                if stopping:
                    finish_timeline()
                    raise _stopped(cfg, stop.signum, done, where, steps)
            seconds = before + time.perf_counter() - started
            comm.where = f"at the end of epoch {epoch + 1}"
            replicas.average_buffers()
            replicas.check()
            test_loss, test_accuracy = evaluate(model, test_loader, comm)
            timeline.lap("evaluation")
            # The last step's finite gradient times a huge lr, or huge weights whose logits
            # overflow: nothing the steps saw, and still nothing to save.
            if not (math.isfinite(test_loss) and np.isfinite(replicas.data).all()):
                raise _diverged(cfg, f"the end of epoch {epoch + 1}", saved,
                                "the weights or the test loss")
            history.append(dict(
                epoch=epoch + 1, train_loss=loss_sum / steps,
                test_loss=float(test_loss), test_accuracy=float(test_accuracy),
                images_per_second=steps * cfg.batch_size / seconds, seconds=seconds,
                world_size=comm.size, lr=float(optimizer.lr)))
            log.epoch(history[-1], cfg.epochs)
            if cfg.checkpoint:
                save(epoch + 1, 0, dict(loss_sum=0.0, seconds=0.0))
                saved, last_save = _position(epoch + 1, 0), time.monotonic()
            agree(comm, lambda: rank0 and log.metrics(history), "metrics write")
            timeline.lap("checkpoint")
            if on_epoch_end:
                on_epoch_end(epoch + 1, model)
    comm.where = "at the end of the run"
    finish_timeline()
    if cfg.plot:
        from ddl.plots import curves
        agree(comm, lambda: rank0 and curves(history, cfg.plot), "plot write")
    return history, model


def _stopped(cfg, signum, done, where, steps):
    """The Stopped error for a run that `signum` stopped after its step `done` (`where`: "epoch
    E, step S"), saved there when it has a checkpoint."""
    kept = (f"{cfg.checkpoint} saved there: --resume continues" if cfg.checkpoint else
            "nothing saved (no --checkpoint)")
    name = signal.Signals(signum or signal.SIGTERM).name
    return Stopped(signum or signal.SIGTERM,
                   f"stopped by {name} after step {done:,} ({where} of {steps}): {kept}")

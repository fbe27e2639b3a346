"""Where a run starts: afresh, or from its checkpoint (`--resume`), and what the start must not
lose (an earlier run's outputs).

What --resume may not change: the run's identity, which its weights, optimizer state and random
streams belong to (the data set too, compared by content). What it ignores: where files go, what
is shown, and when to save or give up. Any other change (epochs, lr, schedule, ...) it applies
from the checkpoint's iteration on, and says so; docs/training.md lists both.
"""
import dataclasses
import os

from ddl import checkpoint
from ddl.comm import agree
from ddl.config import OUTPUTS, flag, outputs
from ddl.data import subset_rows
from ddl.errors import CheckpointError, UsageError, dims
from ddl.evaluation import open_split, reading
from ddl.identity import data_identity, differences

FIXED = ("model", "optimizer", "momentum", "batch_size", "seed", "subset", "subset_draw")
DEFAULT_DATA = "data/mnist.h5"
IGNORED = ("data", "resume", "overwrite", "quiet", "debug", "timeout", "checkpoint_every",
           "checkpoint_seconds", "keep_best") + OUTPUTS


def data_file(cfg):
    """The run's data file: --data, else with --resume the one its checkpoint was trained on (a
    checkpoint from before checkpoints recorded it: the --data it was given), else
    DEFAULT_DATA."""
    if cfg.data:
        return cfg.data
    if cfg.resume and cfg.checkpoint and os.path.lexists(cfg.checkpoint):
        return checkpoint.load(cfg.checkpoint)["data"]["path"]
    return DEFAULT_DATA


def check_inputs(cfg, comm):
    """Open the data and check it against the model; on rank 0 (which alone writes and reads
    checkpoints, and holds the checkpoint's lock by now) check that no earlier output would be
    lost and read the checkpoint to resume. Returns (train set, test set, the training rows
    used: `subset_rows` or None for all, the data's identity, resume state or None, what the
    resume changes: a list of words for the log); raises UsageError."""
    train = open_split(cfg.data, "train")
    test = open_split(cfg.data, "test", (train.image_shape, train.num_classes, "'train' holds"))
    n = min(cfg.subset or train.n, train.n)
    rows = subset_rows(train.labels, n, cfg.seed, cfg.subset_draw) if n < train.n else None
    identity = data_identity(cfg.data, train, test)
    if cfg.batch_size > n:
        raise UsageError(f"--batch-size {cfg.batch_size} is larger than the {n} training images")
    side = min(train.image_shape[1:])
    if cfg.shift >= side:                     # every image would move out of its own frame
        raise UsageError(f"--shift {cfg.shift} moves the {dims(train.image_shape)} images out "
                         f"of the frame: it must be less than {side}")
    state, changes = None, []
    if comm.rank == 0 and cfg.resume and os.path.lexists(cfg.checkpoint):
        state = checkpoint.load(cfg.checkpoint)
        changes = resume_changes(cfg, state, identity, comm.size)
    elif comm.rank == 0 and not (cfg.overwrite or cfg.resume):
        # (--resume with no checkpoint yet starts a new run, which a restart loop relies on: its
        # other outputs are that run's, rewritten from the history it keeps)
        for option, path in outputs(cfg):
            if os.path.exists(path):
                go_on = ("--resume to continue that run" if option == "--checkpoint" else
                         f"--resume to go on with the run in {cfg.checkpoint}"
                         if cfg.checkpoint else "")
                raise UsageError(f"{option} {path} already exists: pass "
                                 f"{go_on + ' or ' if go_on else ''}--overwrite to replace it")
    return train, test, rows, identity, state, changes


def resume_changes(cfg, state, data_id, world_size):
    """Compare the checkpoint's run with `cfg` (see FIXED): raise CheckpointError naming every
    option that may not change, or fewer epochs than are done; return the applied changes."""
    saved, path = state["config"], cfg.checkpoint
    # (how a subset is drawn matters only to a run that has one)
    fixed = [f"{flag(name)} ({saved.get(name)} -> {getattr(cfg, name)})" for name in FIXED
             if saved.get(name) != getattr(cfg, name) and (cfg.subset or name != "subset_draw")]
    differ = differences(state["data"], data_id)
    if differ:
        fixed.append(f"--data (another data set than {state['data']['path']}: its "
                     f"{', '.join(differ)} differ)")
    if fixed:
        raise CheckpointError(f"{path}: --resume cannot change {', '.join(fixed)}: give the "
                              f"run's own options, or start a new run with --overwrite")
    done, steps = int(state["epoch"]), int(state["step"])
    if cfg.epochs < done + (steps > 0):
        trained = f"{done} epochs" + (f" and {steps} steps" if steps else "")
        raise CheckpointError(f"{path} has already trained {trained}: --epochs must be at least "
                              f"{done + (steps > 0)}, got {cfg.epochs}")
    # (checkpoint.load fills in what a format 1 run did without the options that came later)
    changes = [f"{flag(f.name)} {getattr(cfg, f.name)} (was {saved.get(f.name, f.default)})"
               for f in dataclasses.fields(cfg) if f.name not in FIXED + IGNORED
               and saved.get(f.name, f.default) != getattr(cfg, f.name)]
    if int(state["world_size"]) != world_size:
        changes.append(f"{world_size} rank(s) (was {state['world_size']})")
    return changes


def load_resumed(cfg, state, model, optimizer, schedule):
    """Load the checkpoint's states. What --resume may change comes from `cfg`, not from the
    checkpoint: the weight decay, and the lr on which the schedule (rebuilt for the epochs) goes
    on from the saved iteration."""
    with reading(cfg.checkpoint, state["architecture"]):
        model.load_state_dict(state["model"])
        saved = state["optimizer"]
        optimizer.load_state_dict(dict(saved, hyper=dict(saved["hyper"],
                                                         weight_decay=cfg.weight_decay)))
        schedule.load_state_dict(dict(state["schedule"], base_lr=cfg.lr))


def resume(cfg, comm, log, state, changes, model, optimizer, schedule, steps):
    """With --resume: the checkpoint's `state` that rank 0 read (`check_inputs`, with the
    `changes` it found) on every rank, loaded into `model`, `optimizer` and `schedule`, and said
    in the log; returns it, or None for a new run (no checkpoint yet, or no --resume)."""
    if not cfg.resume:
        return None
    state = comm.bcast_obj(state, what="broadcast of the checkpoint")  # rank 0 read it
    if state is None:
        log.info(f"no checkpoint {cfg.checkpoint} yet: starting a new run")
        return None
    agree(comm, lambda: load_resumed(cfg, state, model, optimizer, schedule), "checkpoint load")
    start, first = int(state["epoch"]), int(state["step"])
    log.info(f"resuming {cfg.checkpoint} "
             + (f"at epoch {start + 1}, step {first} of {steps}" if first else
                f"after epoch {start}")
             + "".join(f", {change}" for change in changes)
             + (": nothing left to train (raise --epochs to go on)" if start == cfg.epochs else ""))
    return state

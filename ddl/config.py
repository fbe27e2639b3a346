"""The options of `ddl train`, declared once: `Config`'s fields, whose metadata (help, choices,
lowest values) makes both the click options of `ddl train` and the checks of `check_options`.

To add an option: add a field with `option(...)`; `ddl train` gets its flag, `--help` its text,
and `check_options` its choices or range. Decide whether `--resume` may change it (ddl/resume.py's
FIXED and IGNORED).
"""
import contextlib
import dataclasses
import math
import os

import click

from ddl import checkpoint, exchange, kernels
from ddl.atomic import check_outputs, remove_leftovers
from ddl.data import SUBSET_DRAWS
from ddl.errors import UsageError
from ddl.models import MODELS, check_name, model_inputs
from ddl.optim import OPTIMIZERS
from ddl.schedules import SCHEDULES
from ddl.watchdog import DEFAULT_TIMEOUT

OUTPUTS = ("checkpoint", "metrics", "plot", "timeline")


def option(default, help=None, *, choices=None, at_least=None, finite=None, show_default=None):
    """A field of `Config`: `choices`, the values it may take; `at_least`, an integer's lowest;
    `finite`, "> 0" or ">= 0", what a float must be besides finite; `show_default` (default: for
    numbers and non-empty text) whether --help shows the default."""
    return dataclasses.field(default=default, metadata=dict(
        help=help, choices=choices, at_least=at_least, finite=finite, show_default=show_default))


@dataclasses.dataclass
class Config:
    """Options of `ddl train`; the defaults are the tuned recipe for MNIST (what each choice buys,
    measured, is in docs/training.md, "The recipe")."""
    model: str = option("seed-cnn", f"{', '.join(MODELS)}, or your own: FILE.py:FUNCTION, where "
                                    f"FUNCTION(in_shape, num_classes) returns an nn.Module. "
                                    f"resnet-mini brings its own recipe: the defaults of the "
                                    f"options it changes are its own (docs/training.md).")
    epochs: int = option(7, at_least=1)
    batch_size: int = option(128, "Global batch, split evenly across ranks.", at_least=1)
    micro_batch: int = option(64, "Images per forward/backward pass within a rank's batch (0: "
                                  "all at once).", at_least=0)
    kernels: str = option("numba", "Compiled (numba) or the reference (numpy).",
                          choices=tuple(kernels.NAMES))
    lr: float = option(0.05, finite="> 0")
    optimizer: str = option("sgd", choices=tuple(OPTIMIZERS))
    momentum: float = option(0.9, finite=">= 0")
    weight_decay: float = option(0.0, finite=">= 0")
    schedule: str = option("cosine", "Learning rate over the iterations.",
                           choices=tuple(SCHEDULES))
    warmup: int = option(0, "Iterations of linear learning-rate warm-up.", at_least=0)
    seed: int = option(0, at_least=0)
    data: str = option("", "HDF5 file written by `ddl prepare` [default: with --resume, the "
                           "one the checkpoint was trained on; else data/mnist.h5].")
    subset: int = option(0, "Train on N of the training images only, drawn by --subset-draw "
                            "(seeded by --seed: the same on every rank and at any world size).",
                         at_least=0, show_default=False)
    subset_draw: str = option("stratified", "How --subset draws: every class in its share "
                                            "(stratified), uniformly at random, or the file's "
                                            "first N rows (first; fair only for a file whose rows "
                                            "are in random order).", choices=SUBSET_DRAWS)
    shift: int = option(1, "Augmentation: move each training image by up to N pixels each way.",
                        at_least=0)
    flip: bool = option(False, "Augmentation: mirror half the training images left to right (not "
                               "for digits or text).")
    checkpoint: str = option("", "Write a checkpoint here after every epoch, and where SIGTERM or "
                                 "Ctrl-C stops the run (an existing one needs --resume or "
                                 "--overwrite).")
    checkpoint_every: int = option(0, "Also write it every N steps (0: at epoch ends only).",
                                   at_least=0, show_default=False)
    checkpoint_seconds: float = option(0, "Also write it when this many seconds have passed "
                                          "since the last time.", finite=">= 0",
                                       show_default=False)
    keep_best: bool = option(False, "Also keep the checkpoint of the best test accuracy so far, "
                                    "beside the last: CHECKPOINT with -best before its extension "
                                    "(c.h5: c-best.h5).")
    resume: bool = option(False, "Continue the run saved in --checkpoint (none yet: start "
                                 "afresh).")
    overwrite: bool = option(False, "Replace an existing checkpoint, metrics file, plot or "
                                    "timeline with a new run's.")
    metrics: str = option("", "Write per-epoch metrics here (JSON lines).")
    plot: str = option("", "Write loss and accuracy curves here (PNG, PDF, ...).")
    timeline: str = option("", "Write every rank's phases here as a Chrome trace (Perfetto, "
                               "chrome://tracing), and print where each rank's time went.")
    timeout: float = option(DEFAULT_TIMEOUT, "Seconds a rank may wait for the others in a "
                                             "collective before the job ends naming those that "
                                             "did not arrive (0: wait for ever).", finite=">= 0")
    compress: str = option("auto", "How the gradients cross between ranks: none (exact), bf16 "
                                   "(half the bytes), powersgd or powersgd:RANK (low rank, "
                                   "error feedback; RANK 4 by default), or auto: none on one "
                                   "host, bf16 across hosts (docs/cluster-benchmarks.md).")
    quiet: bool = option(False, "Print nothing but errors.")
    debug: bool = option(False, "Name the first layer and step giving NaN or inf.")


FIELDS = {f.name: f for f in dataclasses.fields(Config)}

# A named model's own recipe: what it trains with where the command line does not say, chosen
# for the model's worst seed as the defaults above were for seed-cnn's (docs/training.md, "The
# recipe"). Never the batch size: `ddl launch` checks it against the ranks from the flags alone.
RECIPES = {"resnet-mini": dict(epochs=5, lr=0.2, warmup=200, weight_decay=5e-4)}


def with_recipe(options, given):
    """`options` ({field: value}, as `ddl train` parsed them) with the recipe of their model for
    every field not in `given`, the fields the command line gave."""
    recipe = RECIPES.get(options.get("model"), {})
    return {**options, **{name: v for name, v in recipe.items() if name not in given}}


def flag(name):
    """The command-line flag of field `name`: "--batch-size" for batch_size."""
    return f"--{name.replace('_', '-')}"


def _click_args(f):
    """(declarations, keyword arguments) of the click option of field `f`."""
    meta = f.metadata
    kwargs = dict(default=f.default, help=meta["help"])
    if f.type is bool:
        kwargs.update(is_flag=True)
    else:
        kwargs.update(type=click.Choice(meta["choices"]) if meta["choices"] else f.type)
        show = meta["show_default"]
        kwargs.update(show_default=f.default != "" if show is None else show)
    return [flag(f.name)], kwargs


def click_option(name):
    """The click option of field `name` (a decorator), for a command that takes it too."""
    args, kwargs = _click_args(FIELDS[name])
    return click.option(*args, **kwargs)


def click_options(command):
    """Decorate click `command` with an option for every field, in the fields' order."""
    for name in reversed(FIELDS):
        command = click_option(name)(command)
    return command


def given(args):
    """The options that `args`, the command line after `ddl train`, gives: {field: value}, read by
    the same parser as `ddl train`'s. What it gives wrongly is left out (the job itself says so)."""
    params = [click.Option(decls, **kwargs) for decls, kwargs in map(_click_args, FIELDS.values())]
    command = click.Command("train", params=params,
                            context_settings=dict(ignore_unknown_options=True))
    try:
        ctx = command.make_context("train", list(args), resilient_parsing=True)
    except click.UsageError:
        return {}
    return {name: value for name, value in ctx.params.items() if value is not None
            and ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE}


def check_options(cfg, world_size):
    """Raise UsageError for a problem visible from the options alone (no I/O)."""
    check_name(cfg.model)
    fields = [(f.name, getattr(cfg, f.name), f.metadata) for f in FIELDS.values()]
    for name, value, meta in fields:
        if meta["choices"] and value not in meta["choices"]:
            raise UsageError(f"unknown {name} {value!r} (choose from "
                             f"{', '.join(meta['choices'])})")
    # Zero means "off" or "all" for the micro-batch, warm-up, subset, shift and checkpoint
    # interval.
    for name, value, meta in fields:
        if meta["at_least"] is not None and value < meta["at_least"]:
            raise UsageError(f"{flag(name)} must be at least {meta['at_least']}, got {value}")
    # What PyTorch's optimizers refuse, and NaN or inf besides, which would spoil every weight.
    for name, value, meta in fields:
        low = meta["finite"]
        if low and not (math.isfinite(value) and (value > 0 if low == "> 0" else value >= 0)):
            raise UsageError(f"{flag(name)} must be a finite number {low}, got {value}")
    check_batch(cfg.batch_size, [world_size])
    for name in ("resume", "checkpoint_every", "checkpoint_seconds", "keep_best"):
        if getattr(cfg, name) and not cfg.checkpoint:
            raise UsageError(f"{flag(name)} needs --checkpoint PATH")
    try:
        exchange.parse(cfg.compress)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if cfg.resume and cfg.overwrite:
        raise UsageError("--resume continues the checkpoint and --overwrite replaces it: "
                         "choose one")


def check_batch(batch_size, sizes, allowed_by=""):
    """Raise UsageError unless the global batch `batch_size` divides by each world size in
    `sizes` (every rank takes an equal share); `allowed_by`: the options that allow several
    sizes, for the message, which names the sizes the batch serves and the batches nearest it that
    serve them all."""
    bad = [w for w in sizes if batch_size % w]
    if not bad:
        return
    if len(sizes) == 1:
        raise UsageError(f"--batch-size {batch_size} (the global batch) does not divide by the "
                         f"{sizes[0]} ranks")
    serves = [w for w in sizes if not batch_size % w]
    step = math.lcm(*sizes)
    near = [b for b in (batch_size // step * step, (batch_size // step + 1) * step) if b]
    raise UsageError(
        f"--batch-size {batch_size} (the global batch) does not divide by "
        f"{', '.join(map(str, bad))} rank(s), which {allowed_by} allow"
        + (f" (it serves {', '.join(map(str, serves))})" if serves else "")
        + f": a run goes on with the same global batch on fewer ranks; "
        f"{' or '.join(map(str, near))} would serve {', '.join(map(str, sizes))} rank(s)")


def best(path):
    """Where --keep-best keeps the best checkpoint beside checkpoint `path`: c.h5 -> c-best.h5."""
    stem, ext = os.path.splitext(path)
    return f"{stem}-best{ext}"


def outputs(cfg):
    """(flag, path) of every file the run writes."""
    found = [(flag(name), getattr(cfg, name)) for name in OUTPUTS if getattr(cfg, name)]
    return found + ([("--keep-best", best(cfg.checkpoint))] if cfg.keep_best else [])


def claim_outputs(cfg):
    """Rank 0's checks of the output paths (none is an input, the data or the model file, nor
    another output; each can be written), then a lock on every output (checkpoint.Lock), returned
    held, for a `with` around the run: two jobs never write one file. Temporary files that a
    killed job left beside the outputs go."""
    written = outputs(cfg)
    check_outputs(written, [("--data", cfg.data)] + model_inputs(cfg.model))
    if cfg.plot:
        from ddl.plots import check_format
        check_format(cfg.plot, "--plot")
    locks = contextlib.ExitStack()
    try:
        for option, path in written:
            locks.enter_context(checkpoint.Lock(path, option))
    except BaseException:                   # a lock refused releases those already taken
        locks.close()
        raise
    for _, path in written:
        remove_leftovers(path)
    return locks

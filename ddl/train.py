"""The training loop, top to bottom: check, set up, (resume), epochs, evaluation, checkpoints.

Every rank runs this same code. The distributed part is set up once (the communicator, the
replicas' flat gradient buffer, the sampler's shard); from then on a world of one and a world of
N differ only inside those objects. A run can stop after any step (SIGTERM, SIGINT) and resume
there: the checkpoint records the step, and every random stream derives from (seed, epoch, step).

Around the loop: the options and their checks (ddl/config.py), where a run starts
(ddl/resume.py), a step's forward and backward (ddl/step.py), evaluation (ddl/evaluation.py),
--debug (ddl/debug.py), and the run's state with its checkpoint writes (ddl/state.py).
"""
import contextlib
import dataclasses
import math
import time

import numpy as np

from ddl import kernels
from ddl.comm import SingleCommunicator, agree
from ddl.config import best, check_options, claim_outputs
from ddl.data import DistributedSampler, Loader
from ddl.debug import finite_check
from ddl.errors import dims
from ddl.evaluation import EvaluationStopped, eval_loader, evaluate
from ddl.identity import listed
from ddl.log import Log
from ddl.models import build, resolve, source_digest
from ddl.nn import CrossEntropyLoss
from ddl.optim import make_optimizer
from ddl.parallel import Replicas
from ddl.preemption import StopRequest
from ddl.resume import check_inputs, data_file, resume
from ddl.schedules import make_schedule
from ddl.state import Run, copy, diverged, finite, position, slow_layers, stopped
from ddl.step import OFF, dropout_layers, rehearse, seed_dropout, train_step
from ddl.timeline import Timeline


def run(cfg, comm=None, on_epoch_end=None):
    """Train with `cfg` on every rank of `comm`; returns (history, model), history holding one
    dict per epoch. `on_epoch_end(epoch, model)` runs after each epoch's checkpoint. A bad option
    or input, a run that diverges, an output that cannot be written and a stop by SIGTERM or
    SIGINT raise a DDLError on every rank together; a rank that does not reach a collective
    within --timeout, Hung on one (see ddl/errors.py)."""
    comm = comm or SingleCommunicator()
    with comm.at("at start-up", timeout=cfg.timeout):
        agree(comm, lambda: check_options(cfg, comm.size), "option check")
        # A model file's path, absolute; the data file, the checkpoint's by default (rank 0 reads
        # it).
        data = cfg.data or comm.bcast_obj(agree(comm, lambda: data_file(cfg) if comm.rank == 0
                                                else None, "checkpoint read"),
                                          what="broadcast of the data file's path")
        cfg = dataclasses.replace(cfg, model=resolve(cfg.model), data=data)
        # Rank 0 holds the checkpoint's lock to the end, so that no second job writes it
        # meanwhile. NumPy's warnings about NaN and inf stay quiet: the loop checks for those.
        with agree(comm, lambda: claim_outputs(cfg) if comm.rank == 0 else
                   contextlib.nullcontext(), "output check"), np.errstate(all="ignore"):
            log = Log(comm.rank == 0 and not cfg.quiet, cfg.metrics if comm.rank == 0 else None)
            r = set_up(cfg, comm, log)
            _train(cfg, comm, log, r, on_epoch_end)
            with comm.at("at the end of the run"):
                r.finish_timeline(log)
                if cfg.plot:
                    from ddl.plots import curves
                    agree(comm, lambda: comm.rank == 0 and curves(r.history, cfg.plot),
                          "plot write")
            return r.history, r.model


def set_up(cfg, comm, log):
    """The data, the kernels, and the same model, optimizer and schedule on every rank, resumed
    from the checkpoint with --resume; returns the Run."""
    train_set, test_set, rows, identity, state, changes = agree(
        comm, lambda: check_inputs(cfg, comm), "input check")
    n_train = train_set.n if rows is None else len(rows)
    log.info(f"data {cfg.data}: {train_set.n:,} train + {test_set.n:,} test images of "
             f"{dims(train_set.image_shape)}, {train_set.num_classes} classes "
             f"({listed(train_set.class_names)})"
             + (f"; training on a {cfg.subset_draw} subset of {n_train:,}" if rows is not None
                else ""))
    if not cfg.checkpoint:
        log.info("no --checkpoint: nothing of this run will be saved")
    kernels.use(cfg.kernels)
    compile_seconds = kernels.warm(comm)   # before any model runs, so rank 0 compiles first
    model = agree(comm, lambda: build(cfg.model, train_set.image_shape, train_set.num_classes,
                                      seed=cfg.seed, input_grad=False))
    convs, plan_seconds = kernels.choose(lambda: rehearse(model, train_set.image_shape,
                                                          cfg.batch_size // comm.size,
                                                          cfg.micro_batch), comm)
    sampler = DistributedSampler(n_train, comm.size, comm.rank, cfg.batch_size, seed=cfg.seed,
                                 rows=rows)
    loader = Loader(train_set, sampler, shift=cfg.shift, flip=cfg.flip)
    test_loader = eval_loader(test_set, comm)
    steps = len(loader)
    check = finite_check(model, cfg.debug)
    replicas = Replicas(model, comm, compress=cfg.compress)
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.momentum,
                               cfg.weight_decay)
    schedule = make_schedule(cfg.schedule, optimizer, cfg.epochs, steps, cfg.warmup)
    # The model fits the data: its images and classes, recorded in the checkpoint to rebuild it.
    # A model file's source is hashed too, so that a file edited since is named as such.
    architecture = dict(model=cfg.model, in_shape=list(train_set.image_shape),
                        num_classes=train_set.num_classes)
    if source_digest(cfg.model):
        architecture["source_sha256"] = source_digest(cfg.model)
    r = Run(cfg, comm, model, replicas, optimizer, schedule, loader, test_loader,
            dict(architecture=architecture, data=identity), check)
    state = resume(cfg, comm, log, state, changes, model, optimizer, schedule, steps)
    if state is not None:
        r.start, r.first, r.partial = int(state["epoch"]), int(state["step"]), state["partial"]
        r.history, r.saved = list(state["history"]), position(r.start, r.first)
        r.resumed_from = int(state["world_size"])
        note = replicas.load_state_dict(state.get("exchange"))
        if note:
            log.info(note)
    log.info(f"{cfg.model} for {dims(train_set.image_shape)} images of "
             f"{train_set.num_classes} classes: {replicas.data.size:,} parameters on "
             f"{comm.size} rank(s); global batch {cfg.batch_size} = {cfg.batch_size // comm.size} "
             f"per rank; {steps} steps per epoch over {n_train:,} images; "
             f"{lr_words(cfg, cfg.epochs * steps)}; {cfg.kernels} kernels"
             + (f" (compiled for CPU {kernels.target()}, ready in {compile_seconds:.1f} s; "
                f"{convs} convolution shape(s) planned in {plan_seconds:.1f} s)"
                if cfg.kernels == "numba" else "")
             + (f"; gradients exchanged: {replicas.compress}" if comm.size > 1 else ""))
    return r


def lr_words(cfg, total):
    """The start line's account of what sets the learning rate over a run of `total` steps,
    saying so where the warm-up (a recipe's, maybe, not the user's) outlasts the run."""
    words = f"{cfg.optimizer} lr {cfg.lr}"
    if cfg.weight_decay:
        words += f", weight decay {cfg.weight_decay:g}"
    if cfg.warmup:
        words += f", {cfg.warmup} warm-up steps"
        if cfg.warmup >= total:
            words += f" (not over within the run's {total}: lr {cfg.lr} is never reached)"
    return words + f", {cfg.schedule} schedule"


def _train(cfg, comm, log, r, on_epoch_end):
    """The epochs of Run `r`, from where it starts; r.history grows by one dict per epoch."""
    model, replicas, loader, steps = r.model, r.replicas, r.loader, len(r.loader)
    criterion, dropouts = CrossEntropyLoss(), dropout_layers(model)
    done = r.start * steps + r.first             # steps taken since the run began
    r.timeline = timeline = Timeline(comm, slow_layers(model)) if cfg.timeline else OFF
    r.last_save = time.monotonic()
    with StopRequest() as stop:
        for epoch in range(r.start, cfg.epochs):
            begin = r.first if epoch == r.start else 0
            loader.set_epoch(epoch, begin)
            model.train()
            # A resumed epoch's figures count the steps before the stop too, and the world sizes
            # that took them (an elastic restart goes on on fewer ranks).
            loss_sum, before, sizes = ((r.partial["loss_sum"], r.partial["seconds"],
                                        list(r.partial.get("world_sizes", []))) if begin else
                                       (0.0, 0.0, []))
            if sizes[-1:] != [comm.size]:
                sizes.append(comm.size)
            started = time.perf_counter()
            for step, (x, y) in enumerate(loader, begin + 1):
                timeline.lap("data")
                done += 1
                r.check.where = where = position(epoch, step)
                with comm.at(f"of step {done:,}"):
                    seed_dropout(dropouts, cfg.seed, epoch, step, comm.rank)
                    replicas.zero_grad()
                    loss = train_step(model, criterion, x, y, cfg.micro_batch, timeline,
                                      replicas.overlapping)
                    timeline.sync(comm)
                    # The global batch's loss, NaN if any rank's loss or gradient is not finite:
                    # then stop before the optimizer spreads it into the weights. With it travel
                    # a SIGTERM or SIGINT that any rank received, and rank 0's clock saying a
                    # checkpoint is due, so that every rank acts on them after the same step.
                    signals = replicas.allreduce_grads(loss, stop=stop.signum > 0, save=(
                        comm.rank == 0 and cfg.checkpoint_seconds > 0
                        and time.monotonic() - r.last_save >= cfg.checkpoint_seconds))
                    timeline.lap("all-reduce")
                    if signals.diverged:
                        raise diverged(cfg, where, r.saved)
                    model.step(r.optimizer)
                    r.schedule.step()
                    timeline.lap("optimizer")
                    loss_sum += signals.loss
                    elapsed = time.perf_counter() - started
                    log.progress(epoch + 1, cfg.epochs, step, steps, signals.loss,
                                 (step - begin) * cfg.batch_size / elapsed,
                                 elapsed / (step - begin) * (steps - step))
                    due = signals.save or (cfg.checkpoint_every
                                           and done % cfg.checkpoint_every == 0)
                    # The epoch's own checkpoint follows its last step within seconds.
                    if cfg.checkpoint and (signals.stop or (due and step < steps)):
                        r.save(epoch, step, dict(loss_sum=loss_sum, seconds=before + elapsed,
                                                 world_sizes=sizes))
                        timeline.lap("checkpoint")
                    if signals.stop:
                        r.finish_timeline(log)
                        raise stopped(cfg, stop.signum, done, where, steps)
            with comm.at(f"at the end of epoch {epoch + 1}"):
                seconds = before + time.perf_counter() - started
                try:
                    _end_epoch(cfg, comm, log, r, epoch, loss_sum, seconds, sizes, stop)
                except EvaluationStopped:   # saved after its last step: --resume evaluates
                    if cfg.checkpoint:
                        r.save(epoch, steps, dict(loss_sum=loss_sum, seconds=seconds,
                                                  world_sizes=sizes))
                    r.finish_timeline(log)
                    raise stopped(cfg, stop.signum, done, position(epoch, steps),
                                   steps) from None
                if on_epoch_end:
                    on_epoch_end(epoch + 1, model)


def _end_epoch(cfg, comm, log, r, epoch, loss_sum, seconds, sizes, stop):
    """After the last step of epoch `epoch` + 1: evaluate (which `stop` may interrupt), record,
    save, write the metrics. `sizes`: the world sizes that took the epoch's steps, in turn
    (several after an elastic restart, recorded then as `world_sizes`)."""
    r.replicas.average_buffers()
    r.replicas.check()
    test_loss, test_accuracy = evaluate(r.model, r.test_loader, comm, stop)
    r.timeline.lap("evaluation")
    # The last step's finite gradient times a huge lr, or huge weights whose logits overflow:
    # nothing the steps saw, and still nothing to save.
    if not (math.isfinite(test_loss) and finite(r.model)):
        raise diverged(cfg, f"the end of epoch {epoch + 1}", r.saved,
                        "the weights or the test loss")
    steps = len(r.loader)
    better = test_accuracy > max((h["test_accuracy"] for h in r.history), default=-1.0)
    r.history.append(dict(
        epoch=epoch + 1, train_loss=loss_sum / steps,
        test_loss=float(test_loss), test_accuracy=float(test_accuracy),
        images_per_second=steps * cfg.batch_size / seconds, seconds=seconds,
        world_size=comm.size, lr=float(r.optimizer.lr),
        **(dict(world_sizes=sizes) if len(sizes) > 1 else {})))
    log.epoch(r.history[-1], cfg.epochs)
    if cfg.checkpoint:
        r.save(epoch + 1, 0, dict(loss_sum=0.0, seconds=0.0))
    if cfg.keep_best and better:
        agree(comm, lambda: comm.rank == 0 and copy(cfg.checkpoint, best(cfg.checkpoint)),
              "checkpoint write")
    agree(comm, lambda: comm.rank == 0 and log.metrics(r.history), "metrics write")
    r.timeline.lap("checkpoint")



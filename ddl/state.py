"""A training run's state on every rank: what set-up made and where the run stands (`Run`), its
checkpoint and timeline writes, and the errors that end it (diverged, stopped). ddl/train.py
drives it."""
import dataclasses
import signal
import time

import numpy as np

from ddl import checkpoint, kernels
from ddl.atomic import write_bytes
from ddl.comm import agree
from ddl.data import Loader
from ddl.errors import Diverged, Stopped
from ddl.parallel import Replicas
from ddl.step import OFF


@dataclasses.dataclass
class Run:
    """What `set_up` made, the same on every rank, and where the run is."""
    cfg: object
    comm: object
    model: object
    replicas: Replicas
    optimizer: object
    schedule: object
    loader: Loader
    test_loader: Loader
    record: dict                    # what each checkpoint holds besides states and position
    check: object                   # --debug's FiniteCheck, or one that checks nothing
    start: int = 0                  # where the run starts: epochs done ...
    first: int = 0                  # ... and steps of the next, with that epoch's sums so far
    partial: dict = dataclasses.field(default_factory=lambda: dict(loss_sum=0.0, seconds=0.0))
    history: list = dataclasses.field(default_factory=list)     # one dict per epoch done
    saved: str = ""                 # where the checkpoint is (position; "" for none yet)
    resumed_from: int = 0           # the world size of the checkpoint's run, when resumed
    last_save: float = 0.0          # time.monotonic() then
    timeline: object = OFF

    def save(self, epoch, step, partial):
        """Rank 0 writes the checkpoint after `step` steps of epoch `epoch` + 1 (0: after epoch
        `epoch`), and every rank hears whether it could: a full disk ends the whole job with one
        line, the previous file kept. A state that is not finite (a BatchNorm running statistic
        that overflowed, say) is never saved: the run stops as diverged, on every rank together
        (mid-epoch each rank's running statistics are its own)."""
        if not self.comm.allreduce_obj(finite(self.model), "min", "finite check of the state"):
            raise diverged(self.cfg, position(epoch, step), self.saved,
                           "a weight or buffer of the model")
        exchange = self.replicas.state_dict()      # a collective: PowerSGD's per-rank errors
        agree(self.comm, lambda: self.comm.rank == 0 and checkpoint.save(self.cfg.checkpoint, dict(
            model=self.model.state_dict(), architecture=self.record["architecture"],
            optimizer=self.optimizer.state_dict(), schedule=self.schedule.state_dict(),
            epoch=epoch, step=step, partial=partial, history=self.history,
            config=dataclasses.asdict(self.cfg), data=self.record["data"],
            world_size=self.comm.size, exchange=exchange)), "checkpoint write")
        self.saved, self.last_save = position(epoch, step), time.monotonic()

    def finish_timeline(self, log):
        """Rank 0 writes the timeline and shows its summary."""
        if self.cfg.timeline:
            begun = self.start * len(self.loader) + self.first
            # A run that goes on on another number of ranks (an elastic restart) says so.
            was = self.resumed_from
            note = (f"resumed at step {begun:,} on {self.comm.size} rank(s), after "
                    f"{was} rank(s)" if was and was != self.comm.size else "")
            for line in agree(self.comm, lambda: self.timeline.write(
                    self.comm, self.cfg.timeline, begun, note), "timeline write"):
                log.info(line)


def slow_layers(model):
    """"name (Type)" of each layer of `model` that the kernels in use run without a compiled
    kernel (the backend's `slow_steps`)."""
    modules = dict(model.named_modules())
    return [f"{name} ({type(modules.get(name, model)).__name__})"
            for name in kernels.get().slow_steps(model)]


def finite(model):
    """Whether every array that a checkpoint of `model` holds, weights and buffers (BatchNorm's
    running statistics), is finite: what `checkpoint.load` will demand of it."""
    arrays = [p.data for p in model.parameters()] + [v for _, v in model.named_buffers()]
    return all(np.isfinite(a).all() for a in arrays)     # state_dict() would copy each first


def copy(source, target):
    """File `source` copied to `target` whole or not at all (the previous one kept)."""
    with open(source, "rb") as f:
        write_bytes(target, f.read())


def position(epoch, step):
    """Where a run is after `step` steps of epoch `epoch` + 1, in words ("epoch 2": its end)."""
    return f"epoch {epoch + 1}, step {step}" if step else f"epoch {epoch}"


def diverged(cfg, where, saved, what="the loss or a gradient"):
    """The error for a run whose `what` turned NaN or inf at `where`; `saved`: where the
    checkpoint is (`position`; "" for none yet)."""
    kept = (f"; {cfg.checkpoint} keeps {saved}" if cfg.checkpoint and saved else
            f"; {cfg.checkpoint} was not written" if cfg.checkpoint else "")
    return Diverged(f"training diverged at {where}: {what} turned NaN or inf{kept} (lower --lr, "
                    f"or find the layer with --debug)", everywhere=True)


def stopped(cfg, signum, done, where, steps):
    """The Stopped error for a run that `signum` stopped after its step `done` (`where`: "epoch
    E, step S"), saved there when it has a checkpoint."""
    kept = (f"{cfg.checkpoint} saved there: --resume continues" if cfg.checkpoint else
            "nothing saved (no --checkpoint)")
    name = signal.Signals(signum or signal.SIGTERM).name
    return Stopped(signum or signal.SIGTERM,
                   f"stopped by {name} after step {done:,} ({where} of {steps}): {kept}")

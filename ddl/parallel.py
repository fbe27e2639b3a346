"""Replica synchronisation: one flat buffer, one broadcast, one gradient exchange, one checksum.

Every parameter's `data` and `grad` become views into two contiguous buffers, so the start-up
broadcast and the divergence check each cost one MPI call whatever the number of layers, and the
gradients' exchange (ddl/exchange.py) cuts its buckets from one buffer. The step's `Signals`
ride in the gradients' buffer, before them: the loss, with it the check that nothing turned NaN
or inf on any rank, and the flags that every rank must agree on at the same step (stop now, save
now).
"""
import contextlib
import math
import typing
import zlib

import numpy as np

from ddl import exchange, kernels
from ddl.errors import ReplicaDivergence


class Signals(typing.NamedTuple):
    """What travels with the gradients in their all-reduce, one float each after them, in this
    order. Sent: this rank's values; received: the world's."""
    loss: float             # the global batch's mean loss; NaN if any loss or gradient was not
                            # finite on any rank (both survive the sum: the finite check)
    stop: bool = False      # a SIGTERM or SIGINT reached a rank: every rank stops after this step
    save: bool = False      # rank 0's clock says a checkpoint is due: every rank saves

    @property
    def diverged(self):
        """Whether a loss or gradient was NaN or inf on some rank."""
        return math.isnan(self.loss)


def flatten(params, dtype=np.float32, spare=0):
    """Rebind each parameter's data and grad as views of two flat arrays of `sum(p.size)` floats;
    the gradients' array has `spare` more at its start, for values that travel with them."""
    total, backend = sum(p.data.size for p in params), kernels.get()
    data, full = backend.empty(total, dtype), backend.empty(total + spare, dtype)
    full[:spare] = 0
    grad, offset = full[spare:], 0
    for p in params:
        n = p.data.size
        data[offset:offset + n] = p.data.ravel()
        grad[offset:offset + n] = p.grad.ravel()
        p.data = data[offset:offset + n].reshape(p.data.shape)
        p.grad = grad[offset:offset + n].reshape(p.grad.shape)
        offset += n
    return data, full


class Replicas:
    """Keeps a model identical on every rank of `comm` (a world of one is fine: no-ops), its
    gradients exchanged as `compress` says (ddl/exchange.py: none, bf16, powersgd[:RANK]; auto is
    decided here)."""

    def __init__(self, model, comm, root=0, compress="none"):
        self.model, self.comm = model, comm
        n = len(Signals._fields)
        self.data, self.reduced = flatten(model.parameters(), spare=n)
        self.grad = self.reduced[n:]                        # after the signals
        self.compress = exchange.resolve(compress, comm)
        self.exchange = exchange.make(self.compress, model.parameters(), comm, self.reduced, n)
        # Seeded init already agrees, but a user's own model or seed handling may not: rank 0 wins.
        comm.bcast(self.data, root=root, what="broadcast of the initial weights")
        buffers = comm.bcast_obj(dict(model.named_buffers()), root=root,
                                 what="broadcast of the initial weights")
        for name, value in model.named_buffers():
            value[...] = buffers[name]

    def zero_grad(self):
        self.grad[...] = 0

    @contextlib.contextmanager
    def overlapping(self):
        """Within the block (a step's last backward), backward starts the exchange of each bucket
        of gradients as soon as it is complete (a model that is not a Sequential exchanges them
        all in `allreduce_grads`)."""
        if self.comm.size == 1:
            yield
            return
        self.model.after_step = self.exchange.after
        try:
            yield
        except BaseException:
            self.exchange.abandon()
            raise
        finally:
            self.model.after_step = None

    def allreduce_grads(self, loss, stop=False, save=False):
        """Average the gradients of all ranks, and their `Signals` with them (each rank's loss is
        a mean over equal local batches, so the averages are the global batch mean's gradient and
        loss), finishing the buckets that `overlapping` started. The finite check costs one pass
        over the buffer and no collective of its own: a NaN or inf anywhere makes the loss NaN on
        every rank. Returns the world's Signals: that loss, and each flag set if any rank set
        it."""
        n = len(Signals._fields)
        self.reduced[:n] = Signals(loss, stop, save)
        if self.comm.size > 1:
            self.exchange.finish()
        finite = np.isfinite(self.reduced).all()
        loss, *flags = self.reduced[:n]
        return Signals(float(loss) if finite else math.nan, *(bool(f) for f in flags))

    def state_dict(self):
        """The exchange's state (PowerSGD's error feedback and warm start) for the checkpoint, on
        rank 0 (a collective: every rank calls it); None elsewhere."""
        state = self.exchange.state_dict() if self.comm.size > 1 else {}
        return None if state is None else dict(state, compress=self.compress,
                                               world_size=self.comm.size)

    def load_state_dict(self, state):
        """Restore `state_dict()`'s state when it comes from the same --compress and world size;
        returns why it could not (a note for the log), or ""."""
        if not state or "error" not in state:         # none and bf16 keep nothing
            return ""
        if (state["compress"], int(state["world_size"])) == (self.compress, self.comm.size):
            self.exchange.load_state_dict(state)
            return ""
        return (f"the {state['compress']} exchange's state of {int(state['world_size'])} "
                f"rank(s) does not apply to {self.compress} on {self.comm.size}: starting afresh")

    def average_buffers(self):
        """Running statistics (BatchNorm) saw only their rank's data: average them before eval."""
        if self.comm.size == 1:
            return
        for _, value in self.model.named_buffers():
            if np.issubdtype(value.dtype, np.floating):
                self.comm.allreduce(value, what="all-reduce of the running statistics")
                value *= value.dtype.type(1.0 / self.comm.size)

    def check(self):
        """Raise ReplicaDivergence unless every rank holds bit-identical parameters."""
        crcs = self.comm.allgather_obj(zlib.crc32(self.data), what="replicas' checksum")
        odd = [r for r, crc in enumerate(crcs) if crc != crcs[0]]
        if odd:
            raise ReplicaDivergence(f"model replicas diverged across ranks: the parameters of "
                                    f"rank(s) {', '.join(map(str, odd))} differ from rank 0's")

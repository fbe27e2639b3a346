"""Replica synchronisation: one flat buffer, one broadcast, one all-reduce, one checksum.

Every parameter's `data` and `grad` become views into two contiguous buffers, so the start-up
broadcast, the per-step gradient all-reduce and the divergence check each cost one MPI call
whatever the number of layers (Horovod's tensor fusion and PyTorch DDP's buckets, taken to the
limit that these small models allow). The step's `Signals` ride in the gradients' buffer: the
loss, with it the check that nothing turned NaN or inf on any rank, and the flags that every rank
must agree on at the same step (stop now, save now).
"""
import math
import typing
import zlib

import numpy as np

from ddl import kernels
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
    the gradients' array has `spare` more at its end, for values that travel with them."""
    total, backend = sum(p.data.size for p in params), kernels.get()
    data, grad = backend.empty(total, dtype), backend.empty(total + spare, dtype)
    offset = 0
    for p in params:
        n = p.data.size
        data[offset:offset + n] = p.data.ravel()
        grad[offset:offset + n] = p.grad.ravel()
        p.data = data[offset:offset + n].reshape(p.data.shape)
        p.grad = grad[offset:offset + n].reshape(p.grad.shape)
        offset += n
    return data, grad


class Replicas:
    """Keeps a model identical on every rank of `comm` (a world of one is fine: no-ops)."""

    def __init__(self, model, comm, root=0):
        self.model, self.comm = model, comm
        self.data, self.reduced = flatten(model.parameters(), spare=len(Signals._fields))
        self.grad = self.reduced[:-len(Signals._fields)]    # then the signals
        # Seeded init already agrees, but a user's own model or seed handling may not: rank 0 wins.
        comm.bcast(self.data, root=root, what="broadcast of the initial weights")
        buffers = comm.bcast_obj(dict(model.named_buffers()), root=root,
                                 what="broadcast of the initial weights")
        for name, value in model.named_buffers():
            value[...] = buffers[name]

    def zero_grad(self):
        self.grad[...] = 0

    def allreduce_grads(self, loss, stop=False, save=False):
        """Average the gradients of all ranks, and their `Signals` with them, in one all-reduce
        (each rank's loss is a mean over equal local batches, so the averages are the global batch
        mean's gradient and loss). The finite check costs one pass over the buffer and no
        collective of its own: a NaN or inf anywhere makes the loss NaN on every rank. Returns
        the world's Signals: that loss, and each flag set if any rank set it."""
        n = len(Signals._fields)
        self.reduced[-n:] = Signals(loss, stop, save)
        if self.comm.size > 1:
            self.comm.allreduce(self.reduced, what="gradient all-reduce")
            self.reduced *= np.float32(1.0 / self.comm.size)
        finite = np.isfinite(self.reduced).all()
        loss, *flags = self.reduced[-n:]
        return Signals(float(loss) if finite else math.nan, *(bool(f) for f in flags))

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

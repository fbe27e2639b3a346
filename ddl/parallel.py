"""Replica synchronisation: one flat buffer, one broadcast, one all-reduce, one checksum.

Every parameter's `data` and `grad` become views into two contiguous buffers, so the start-up
broadcast, the per-step gradient all-reduce and the divergence check each cost one MPI call
whatever the number of layers (Horovod's tensor fusion and PyTorch DDP's buckets, taken to the
limit that these small models allow). The loss rides in the gradients' buffer, and with it the
check that nothing turned NaN or inf on any rank, and the flags that every rank must agree on at
the same step (stop now, save now).
"""
import math
import zlib

import numpy as np

from ddl import kernels
from ddl.errors import ReplicaDivergence


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

    def __init__(self, model, comm, root=0, flags=0):
        self.model, self.comm = model, comm
        self.data, self.reduced = flatten(model.parameters(), spare=1 + flags)
        self.grad = self.reduced[:-1 - flags]   # then the loss, then the flags
        # Seeded init already agrees, but a user's own model or seed handling may not: rank 0 wins.
        comm.bcast(self.data, root=root, what="broadcast of the initial weights")
        buffers = comm.bcast_obj(dict(model.named_buffers()), root=root,
                                 what="broadcast of the initial weights")
        for name, value in model.named_buffers():
            value[...] = buffers[name]

    def zero_grad(self):
        self.grad[...] = 0

    def allreduce_grads(self, loss, *flags):
        """Average the gradients of all ranks, and their `loss`es with them, in one all-reduce
        (each rank's loss is a mean over equal local batches, so the averages are the global batch
        mean's gradient and loss). Returns that loss, or NaN if it or any gradient is NaN or inf on
        any rank: both survive the sum, so every rank gets the same answer with no collective of
        its own, for one pass over the buffer. `flags`, as many booleans as the constructor was
        told, ride along too. Returns (that loss, the flags, each set if any rank set it)."""
        n = len(flags)
        self.reduced[-1 - n:] = (loss, *flags)
        if self.comm.size > 1:
            self.comm.allreduce(self.reduced, what="gradient all-reduce")
            self.reduced *= np.float32(1.0 / self.comm.size)
        loss = float(self.reduced[-1 - n]) if np.isfinite(self.reduced).all() else math.nan
        return loss, tuple(bool(f) for f in self.reduced[len(self.reduced) - n:])

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

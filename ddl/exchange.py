"""How the ranks' gradients meet: in buckets started while backward still runs, exact or compressed.

`Replicas` (ddl/parallel.py) owns the flat buffer `reduced` = [Signals | gradients]; an exchange
sums it over the ranks and scales it to the mean. Three methods (`--compress`):

- `none`: exact. The gradients are cut, at parameter boundaries, into buckets of about
  BUCKET_BYTES taken from the end of the buffer (the last layers, whose gradients backward makes
  first); each is all-reduced (nonblocking) as soon as backward has passed its first parameter,
  and MPI moves the requests on while backward runs: across hosts a thread tests them every
  200 us (ddl/progress.py), on one host they are tested after every layer.
  The first bucket (the first layers) and the Signals before it go last, when the step ends, in
  one all-reduce. Each element is summed by the same MPI algorithm over the same ranks as one
  all-reduce of the whole buffer (pairwise, in rank order), so the result is today's.
- `bf16`: each bucket is rounded to bfloat16 (to nearest, ties to even) and all-gathered as
  uint16: MPI has no bf16 sum, and a gather then a float32 sum in rank order (the same on every
  rank, so the replicas stay identical) sends half the bytes of a float32 all-reduce on 2 ranks
  (an all-gather's bytes grow with the ranks: at 4 ranks it sends as many as float32 would).
  The Signals travel exactly, as float32, in an all-reduce of their own.
- `powersgd[:RANK]`: Vogels, Karimireddy and Jaggi's PowerSGD (NeurIPS 2019) as PyTorch's
  `powerSGD_hook`: each weight, seen as a matrix M (out, -1) plus this rank's error, is sent as
  P = M Q (all-reduced, then orthonormalised) and Q = M^T P (all-reduced); the update is P Q^T
  over the ranks, and each rank keeps what its own share missed, M - P Q_own^T, for the next
  step (error feedback). Q starts from the last step's (warm start). 1-D parameters, and
  matrices that compression would not shrink twofold, go uncompressed, as float32, with the
  Signals. Rank 4 (DEFAULT_RANK) sends ref-cnn's 0.90 MB of gradients as 41 kB.

`auto` (the default) is `none` when every rank runs on one host and `bf16` across hosts: it halves
the bytes at no measurable cost in accuracy; over links slower than about 1 Gbit/s, `powersgd`
is the one that keeps the ranks busy (docs/cluster-benchmarks.md).
"""
import numpy as np

from ddl import kernels
from ddl.progress import Progress

METHODS = ("auto", "none", "bf16", "powersgd")
DEFAULT_RANK = 4
BUCKET_BYTES = 256 * 1024
WHAT = "gradient all-reduce"


def parse(spec):
    """(method, rank) of a --compress value ("powersgd:8" -> ("powersgd", 8)); ValueError with
    a one-line reason for anything else."""
    name, colon, rank = spec.partition(":")
    if name not in METHODS or (colon and not (name == "powersgd" and rank.isdigit()
                                               and int(rank) >= 1)):
        raise ValueError(f"--compress {spec}: expected none, bf16, powersgd, powersgd:RANK "
                         f"(RANK >= 1) or auto")
    return name, int(rank) if colon else DEFAULT_RANK


def resolve(spec, comm):
    """The --compress value `spec` with `auto` decided from the hosts of `comm`'s ranks, and
    PowerSGD's rank spelled out ("powersgd" -> "powersgd:4")."""
    name, rank = parse(spec)
    if name != "auto":
        return f"powersgd:{rank}" if name == "powersgd" else spec
    return "none" if len(set(comm.hosts)) == 1 else "bf16"


def make(spec, params, comm, reduced, head):
    """The exchange for resolved --compress `spec` over `reduced` ([`head` Signals | the
    gradients of `params`, end to end in their order])."""
    name, rank = parse(spec)
    kind = {"none": Exact, "bf16": BFloat16, "powersgd": PowerSGD}[name]
    return kind(params, comm, reduced, head, **({"rank": rank} if name == "powersgd" else {}))


class Exact:
    """`none`: buckets of float32, all-reduced while backward runs (see the module's docstring)."""

    def __init__(self, params, comm, reduced, head):
        self.comm, self.reduced, self.head = comm, reduced, head
        self.grad = reduced[head:]
        sizes = [p.grad.size for p in params]
        starts = np.cumsum([0] + sizes[:-1])
        self.offset = {id(p): int(s) for p, s in zip(params, starts)}
        # Bucket bounds from the end, at parameter boundaries; the last starts at 0.
        self.bounds, hi, lo = [], len(self.grad), len(self.grad)
        for start in reversed(starts):
            lo = int(start)
            if (hi - lo) * reduced.itemsize >= BUCKET_BYTES and lo > 0:
                self.bounds.append((lo, hi))
                hi = lo
        self.bounds.append((0, hi))
        self._owned = {}
        # Across hosts a thread tests the started buckets while backward computes; on one host
        # the tests between layers suffice, and the thread's wake-ups cost more than they
        # gain (docs/cluster-benchmarks.md).
        self.progress = Progress() if len(set(comm.hosts)) > 1 else None
        self.begin()

    def begin(self):
        """A new step: no bucket started yet."""
        self.started, self.pending = 0, []

    def after(self, step):
        """Backward has passed `step` (a layer, or the backend's fused group of layers): start
        every bucket whose gradients are all complete now, and let MPI move the started ones on
        (here, or in the progress thread until `finish`)."""
        frontier = self._frontier(step)
        while self.started < len(self.bounds) - 1 and self.bounds[self.started][0] >= frontier:
            self.pending.append(self._start(*self.bounds[self.started]))
            if self.progress is not None:
                self.progress.add(self.pending[-1])
            self.started += 1
        if self.progress is None:
            for request in self.pending:
                request.test()

    def finish(self):
        """Start what backward did not, wait for everything, and leave the world's mean gradients
        and Signals in `reduced`."""
        if self.progress is not None:
            self.progress.pause()
        while self.started < len(self.bounds) - 1:
            self.pending.append(self._start(*self.bounds[self.started]))
            self.started += 1
        self._last()
        for request in self.pending:
            request.wait()
        self._combine()
        self.reduced *= np.float32(1.0 / self.comm.size)
        self.begin()

    def abandon(self):
        """The step ends without `finish` (an exception in backward): stop testing its
        requests."""
        if self.progress is not None:
            self.progress.pause()

    def _frontier(self, step):
        """The lowest offset of `step`'s parameters (everything above it is complete, since
        backward runs through the layers in reverse order of their parameters); the buffer's
        end for a step that has none."""
        key = id(step)
        if key not in self._owned:
            modules = [step] + [v for v in vars(step).values() if hasattr(v, "parameters")]
            offsets = [self.offset[id(p)] for m in modules if hasattr(m, "parameters")
                       for p in m.parameters() if id(p) in self.offset]
            self._owned[key] = min(offsets, default=len(self.grad))
        return self._owned[key]

    def _start(self, lo, hi):
        return self.comm.iallreduce(self.grad[lo:hi], what=WHAT)

    def _last(self):
        """The first bucket, with the Signals before it: one all-reduce."""
        self.pending.append(self.comm.iallreduce(self.reduced[:self.head + self.bounds[-1][1]],
                                                 what=WHAT))

    def _combine(self):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class BFloat16(Exact):
    """`bf16`: each bucket all-gathered as bfloat16, summed in float32 in rank order."""

    def begin(self):
        super().begin()
        self.gathered = []

    def _start(self, lo, hi):
        mine = np.empty(hi - lo, np.uint16)
        kernels.get().round_bf16(self.grad[lo:hi], mine)
        every = np.empty((self.comm.size, hi - lo), np.uint16)
        self.gathered.append((lo, hi, every))
        return self.comm.iallgather(mine, every, what=WHAT)

    def _last(self):
        self.pending.append(self._start(*self.bounds[-1]))
        self.pending.append(self.comm.iallreduce(self.reduced[:self.head], what=WHAT))

    def _combine(self):
        for lo, hi, every in self.gathered:
            kernels.get().sum_bf16(every, self.grad[lo:hi])


class PowerSGD(Exact):
    """`powersgd:RANK`: low-rank gradients with error feedback and warm start."""

    def __init__(self, params, comm, reduced, head, rank=DEFAULT_RANK):
        super().__init__(params, comm, reduced, head)
        self.rank = rank
        self.matrices, plain = [], []          # (offset, rows, columns); flat (offset, size)
        for p in params:
            off, rows = self.offset[id(p)], p.grad.shape[0] if p.grad.ndim else 1
            cols = p.grad.size // rows
            if p.grad.ndim >= 2 and 2 * (rows + cols) * min(rank, rows, cols) < rows * cols:
                self.matrices.append((off, rows, cols))
            else:
                plain.append(np.arange(off, off + p.grad.size))
        self.plain = np.concatenate(plain) if plain else np.zeros(0, np.int64)
        self.ranks = [min(rank, rows, cols) for _, rows, cols in self.matrices]
        self.p_size = sum(rows * r for (_, rows, _), r in zip(self.matrices, self.ranks))
        self.q_size = sum(cols * r for (_, _, cols), r in zip(self.matrices, self.ranks))
        # Warm start: the same random Q on every rank, then the last step's.
        self.q = np.random.default_rng(0).standard_normal(self.q_size).astype(np.float32)
        self.error = np.zeros(len(self.grad), np.float32)

    def after(self, step):
        pass                                   # P needs the whole gradient: all at the end

    def finish(self):
        n = self.head
        staged = np.concatenate([self.reduced[:n], self.grad[self.plain]])
        plain = self.comm.iallreduce(staged, what=WHAT)
        m = self.grad + self.error             # this rank's gradient plus what it owes
        mats, qs, ps = self._views(m, self.q), [], []
        p = np.empty(self.p_size, np.float32)
        for (mat, q), pv in zip(mats, self._split(p, rows=True)):
            np.matmul(mat, q, out=pv)
            ps.append(pv)
        self.comm.iallreduce(p, what=WHAT).wait()
        finite = np.isfinite(p).all()
        if finite:
            for pv in ps:
                pv[...] = np.linalg.qr(pv)[0]
        mine = np.empty(self.q_size, np.float32)
        for (mat, _), pv, qv in zip(mats, ps, self._split(mine, rows=False)):
            np.matmul(mat.T, pv, out=qv)
            qs.append(qv.copy())
        total = mine.copy()
        self.comm.iallreduce(total, what=WHAT).wait()
        for (off, rows, cols), pv, q_own, q_all in zip(
                self.matrices, ps, qs, self._split(total, rows=False)):
            m_mat = m[off:off + rows * cols].reshape(rows, cols)
            self.error[off:off + rows * cols] = (m_mat - pv @ q_own.T).ravel()
            self.grad[off:off + rows * cols] = (pv @ q_all.T).ravel()
        if finite:
            self.q = total
        else:                                  # the step ends the run (diverged); say so
            self.grad[...] = np.nan
        plain.wait()
        self.reduced[:n] = staged[:n]
        self.grad[self.plain] = staged[n:]
        self.reduced *= np.float32(1.0 / self.comm.size)
        self.begin()

    def _split(self, flat, rows):
        """Views of `flat` as each matrix's (rows or columns, rank) factor."""
        out, at = [], 0
        for (_, r_, c_), k in zip(self.matrices, self.ranks):
            size = (r_ if rows else c_) * k
            out.append(flat[at:at + size].reshape(-1, k))
            at += size
        return out

    def _views(self, m, q):
        return [(m[off:off + rows * cols].reshape(rows, cols), qv)
                for (off, rows, cols), qv in zip(self.matrices, self._split(q, rows=False))]

    def bytes_per_step(self):
        """Floats each rank contributes per step: P, Q, the uncompressed rest and the Signals."""
        return 4 * (self.p_size + self.q_size + len(self.plain) + self.head)

    def state_dict(self):
        """Warm start (the same on every rank) and every rank's error, gathered on rank 0 (a
        collective); None elsewhere."""
        errors = self.comm.gather_obj(self.error, what="gather of the error feedback")
        if errors is None:
            return None
        return dict(q=self.q.copy(), error=np.stack(errors))

    def load_state_dict(self, state):
        """Restore `state_dict()`'s state, saved by a run of the same world size."""
        self.q[...] = state["q"]
        self.error[...] = state["error"][self.comm.rank]

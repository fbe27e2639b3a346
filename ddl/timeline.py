"""`ddl train --timeline PATH`: where every rank's time goes, as a Chrome trace-event file
(Perfetto, chrome://tracing) with one track per rank, and a summary that rank 0 prints.

Each rank records its phases back to back: `lap(kind)` ends the phase that the previous lap
ended, so a step costs a few clock reads and appends. Before the gradient all-reduce the ranks
meet at a barrier, so that the time spent waiting for the slowest rank ("wait") is told apart from
the transfer itself ("all-reduce"). Clocks are aligned at a barrier when the timeline starts. At
the end rank 0 gathers every rank's phases and writes the file.
"""
import json
import os
import socket
import time
from array import array

import numpy as np

from ddl.atomic import write_bytes

KINDS = ("data", "forward", "backward", "wait", "all-reduce", "optimizer", "evaluation",
         "checkpoint")
_INDEX = {kind: i for i, kind in enumerate(KINDS)}
# The summary's columns, and the trace's categories.
GROUPS = {"data": "data", "forward": "compute", "backward": "compute", "optimizer": "compute",
          "wait": "waiting", "all-reduce": "communication", "evaluation": "evaluation",
          "checkpoint": "checkpoint"}
COLUMNS = ("compute", "communication", "waiting", "data", "evaluation", "checkpoint")


class Off:
    """The timeline when --timeline is not given: every call does nothing."""

    def lap(self, kind):
        pass

    def sync(self, comm):
        pass


class Timeline:
    """This rank's phases since construction (a barrier of every rank of `comm`). `slow`: the
    model's layers that run without compiled kernels (descriptions), which the summary names."""

    def __init__(self, comm, slow=()):
        comm.barrier(what="barrier that starts the timeline")
        self.slow = list(slow)
        self.origin = self.last = time.perf_counter()
        self.laps = array("d")      # (kind index, start, end) after (kind index, start, end)

    def lap(self, kind):
        """The phase since the last lap was `kind` (one of KINDS)."""
        now = time.perf_counter()
        self.laps.extend((_INDEX[kind], self.last, now))
        self.last = now

    def sync(self, comm):
        """Wait for every rank before the gradient all-reduce, as a phase of its own."""
        comm.barrier(what="gradient all-reduce")
        self.lap("wait")

    def write(self, comm, path, first_step, note=""):
        """Gather every rank's phases on rank 0, which writes the trace to `path` and returns the
        summary lines; other ranks return []. `first_step`: the run's step count at the start
        (a resumed run's steps go on from there); `note`: what the start was, if worth a word
        (a world size that changed), marked in the trace and said in the summary."""
        laps = np.frombuffer(self.laps, np.float64).reshape(-1, 3).copy()
        laps[:, 1:] -= self.origin
        ranks = comm.gather_obj((laps, socket.gethostname(), os.getpid()),
                                what="gather of the timeline")
        if ranks is None:
            return []
        write_bytes(path, json.dumps(trace(ranks, first_step, note)).encode())
        lines = summary([laps for laps, _, _ in ranks], path) + [note] * bool(note)
        if self.slow:
            lines.append("layers without compiled kernels, run by the NumPy reference (the slow "
                         f"steps of forward and backward): {', '.join(self.slow)}")
        return lines


def trace(ranks, first_step, note=""):
    """The trace-event object of `ranks`, a list of (laps (k, 3), host, pid) in rank order: one
    thread track per rank, each step a slice holding its phases; `note`, a global instant event
    at the start."""
    events = [dict(ph="M", name="process_name", pid=0, tid=0,
                   args=dict(name=f"ddl train, {len(ranks)} rank(s)"))]
    if note:
        events.append(dict(ph="i", s="g", name=note, pid=0, tid=0, ts=0))
    for rank, (laps, host, pid) in enumerate(ranks):
        events += [dict(ph="M", name="thread_name", pid=0, tid=rank,
                        args=dict(name=f"rank {rank} ({host}, pid {pid})")),
                   dict(ph="M", name="thread_sort_index", pid=0, tid=rank,
                        args=dict(sort_index=rank))]
        step, begun, phases = first_step, None, []    # the step under way: data ... optimizer
        for index, start, end in laps.tolist():
            kind = KINDS[int(index)]
            if kind == "data":
                begun = start
            (phases if begun is not None else events).append(
                _slice(kind, GROUPS[kind], rank, start, end))
            if kind == "optimizer":                       # the step's slice, then its phases
                step += 1
                events += [_slice(f"step {step:,}", "step", rank, begun, end)] + phases
                begun, phases = None, []
        events += phases
    return dict(traceEvents=events, displayTimeUnit="ms")


def _slice(name, category, rank, start, end):
    """A complete event; times in microseconds, as the format wants."""
    return dict(ph="X", name=name, cat=category, pid=0, tid=rank, ts=round(start * 1e6, 3),
                dur=round((end - start) * 1e6, 3))


def summary(ranks, path):
    """Lines for the log: seconds per rank in each of COLUMNS, and which rank the others waited
    for when that stands out."""
    table = np.zeros((len(ranks), len(COLUMNS)))
    for rank, laps in enumerate(ranks):
        for index, start, end in laps:
            table[rank, COLUMNS.index(GROUPS[KINDS[int(index)]])] += end - start
    lines = [f"timeline {path}: seconds per rank",
             "rank " + "".join(f"{c:>14}" for c in COLUMNS)]
    lines += [f"{rank:>4} " + "".join(f"{v:14.2f}" for v in row) for rank, row in enumerate(table)]
    waiting = table[:, COLUMNS.index("waiting")]
    if len(ranks) > 1:
        slowest = int(waiting.argmin())
        others = np.delete(waiting, slowest).mean()
        # A straggler makes every other rank wait at each step; a gap of 5% of the run or more
        # is worth a word, noise is not.
        if others - waiting[slowest] > 0.05 * table[slowest].sum():
            lines.append(f"rank {slowest} is the slowest: it waited {waiting[slowest]:.2f} s "
                         f"for the others, they waited {others:.2f} s for it on average")
    return lines

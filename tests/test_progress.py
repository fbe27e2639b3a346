"""The progress thread (ddl/progress.py): it tests requests while one long compiled kernel of
backward runs, and nothing of it runs once the step has paused it."""
import threading
import time

import numpy as np

from ddl import kernels
from ddl.models import build
from ddl.nn import CrossEntropyLoss
from ddl.progress import Progress


class Request:
    """A request that completes at its `tests`-th test, recording when and where it was tested."""

    def __init__(self, tests=10**9):
        self.tests, self.at, self.threads = tests, [], set()

    def test(self):
        self.at.append(time.perf_counter())
        self.threads.add(threading.get_ident())
        return len(self.at) >= self.tests


def test_requests_are_tested_during_the_longest_kernel_of_backward():
    """ref-cnn's backward on the compiled kernels, whose longest step is one kernel call (the
    second convolution's): the thread tested the request again and again while that call ran,
    so the kernel released the GIL and MPI would have moved the transfer on."""
    with kernels.using("numba"):
        model = build("ref-cnn", (1, 28, 28), 10, seed=0, input_grad=False)
        loss = CrossEntropyLoss()
        x = np.random.default_rng(0).standard_normal((512, 1, 28, 28)).astype(np.float32)
        y = np.arange(512) % 10
        loss(model.forward(x), y)
        ends = [time.perf_counter()]
        model.after_step = lambda step: ends.append(time.perf_counter())
        progress, request = Progress(), Request()
        progress.add(request)
        model.backward(loss.backward())
        progress.pause()
    longest = int(np.argmax(np.diff(ends)))
    start, end = ends[longest], ends[longest + 1]
    during = sum(start < t < end for t in request.at)
    assert during >= 5, (end - start, during)
    assert request.threads != {threading.get_ident()}          # tested by the thread alone


def test_a_completed_request_is_dropped_and_a_paused_thread_stays_out_of_mpi():
    progress, done, open_ = Progress(), Request(tests=3), Request()
    progress.add(done)
    progress.add(open_)
    deadline = time.perf_counter() + 10
    while len(open_.at) < 6 and time.perf_counter() < deadline:
        time.sleep(0.001)
    assert len(done.at) == 3 and len(open_.at) >= 6        # done was no longer tested
    progress.pause()
    assert progress.idle()
    tested = len(open_.at)
    time.sleep(0.05)
    assert len(open_.at) == tested                          # nothing runs after the step

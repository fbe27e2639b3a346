"""Moving the step's nonblocking collectives on while backward computes: a thread that tests them.

MPICH moves a nonblocking collective on only inside MPI calls, and over TCP a large one needs
many: its rendezvous, then one to refill the socket each time it drains. Tests between layers are
not enough when one layer's backward is most of the step (ref-cnn's second convolution: one
compiled call), so, while requests are outstanding, a thread tests them every INTERVAL seconds and
sleeps in between: the compiled kernels release the GIL (`jit.kernel`'s nogil), and a wake-up
costs about 27 us of CPU, 5% to 8% of a core while requests are outstanding, not a core (2 ranks
may share 2 cores). Every 200 us hid a 0.8 MB transfer at 1 Gbit/s behind 10 ms of computing;
every 1 ms hid little of it (docs/cluster-benchmarks.md).

MPI runs at MPI_THREAD_SERIALIZED: one thread in MPI at a time, under the communicator's lock
(ddl/comm.py), which a request's `test()` takes too. `pause()` returns once the thread is out of
MPI and will not enter it again until the next `add`: the step's waits (the watchdog's, which
name a rank that hangs) then run on the main thread alone, as before.
"""
import threading
import time

INTERVAL = 200e-6


class Progress:
    """The tester of one exchange's requests (objects with `test()`, MPI's Test: True once done)."""

    def __init__(self, interval=INTERVAL):
        self.interval = interval
        self._state = threading.Condition()   # guards _requests and _busy
        self._requests, self._busy = [], False
        self._thread = None

    def add(self, request):
        """Test `request` until it completes or `pause()`."""
        with self._state:
            self._requests.append(request)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="mpi-progress", daemon=True)
                self._thread.start()
            self._state.notify()

    def pause(self):
        """Stop testing: on return, the thread is not in MPI and waits for the next `add`."""
        with self._state:
            self._requests = []
            while self._busy:
                self._state.wait()

    def idle(self):
        """Whether the thread has nothing to test and is not testing."""
        with self._state:
            return not self._requests and not self._busy

    def _run(self):
        while True:
            with self._state:
                while not self._requests:
                    self._state.wait()
                requests, self._busy = list(self._requests), True
            done = [r for r in requests if r.test()]
            with self._state:
                self._busy = False
                # Drop what completed (`pause` may have emptied the list meanwhile).
                self._requests = [r for r in self._requests if r not in done]
                self._state.notify_all()
            time.sleep(self.interval)

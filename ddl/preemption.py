"""SIGTERM, SIGINT and SIGHUP as a request to stop after the current step.

Schedulers send SIGTERM some time before they kill a job (Slurm's KillWait, Kubernetes' grace
period), `ddl launch` forwards a Ctrl-C as one, and a closed terminal or a lost ssh session sends
SIGHUP. While training, the signal only raises a flag;
the loop sends it with the step's gradients, so that every rank learns of it at the same step,
finishes that step, and rank 0 saves a checkpoint there. A second signal gets the usual treatment
at once: Ctrl-C raises KeyboardInterrupt, SIGTERM and SIGHUP end the process.
"""
import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class StopRequest:
    """`with StopRequest() as stop:` ... `stop.signum` is the first of SIGNALS that this process
    received inside the block (0: none yet)."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def __enter__(self):
        # Python runs signal handlers in the main thread only, and only it may install them.
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._received) for s in SIGNALS}
        return self

    def _received(self, signum, _frame):
        self.signum = signum
        self._restore()                 # the next signal gets the usual treatment

    def _restore(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def __exit__(self, *exc):
        self._restore()

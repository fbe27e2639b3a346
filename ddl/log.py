"""What rank 0 shows: one progress bar per epoch, one summary line per epoch, and the metrics file.

Every rank builds the same Log; only an enabled one (rank 0, not --quiet) prints, so the training
loop never asks "am I rank 0?" around a print. It prints to stderr: `ddl train`'s lines are a log
of the run, as errors are; what a command answers (`evaluate`'s accuracy, `predict`'s classes,
`prepare`'s summary, `summary`'s table) goes to stdout (docs/your-project.md).
"""
import json
import os
import sys
import time

from ddl.atomic import write_bytes


class Log:
    def __init__(self, enabled, metrics_path=None, stream=None):
        # sys.stderr as it is now, not as it was at import (a test may have replaced it since)
        self.enabled, self.metrics_path = enabled, metrics_path
        self.stream = stream or sys.stderr
        # A terminal gets a bar redrawn in place; a pipe or a file (mpirun's forwarding, CI logs)
        # gets a plain line now and then. `ddl launch` tells its ranks when a terminal is behind it.
        self.tty = self.stream.isatty() or os.environ.get("DDL_TTY") == "1"
        self.every = 0.25 if self.tty else 10.0
        self._last = time.perf_counter()

    def info(self, text):
        if self.enabled:
            print(text, file=self.stream, flush=True)

    def progress(self, epoch, epochs, step, steps, loss, images_per_second, seconds_left=None):
        """A throttled in-place bar: `step` of `steps` done, the last local loss, throughput, and
        the time the epoch's remaining steps will take at the pace so far (`seconds_left`)."""
        now = time.perf_counter()
        if not self.enabled or (now - self._last < self.every and (step < steps or not self.tty)):
            return
        self._last = now
        width = 24
        filled = width * step // steps
        bar = "#" * filled + "." * (width - filled)
        start, end = ("\r", "\n" if step == steps else "") if self.tty else ("", "\n")
        print(f"{start}epoch {epoch}/{epochs} [{bar}] {step}/{steps} loss {loss:.4f} "
              f"{images_per_second:,.0f} img/s"
              + ("" if seconds_left is None else f" ETA {clock(seconds_left)}"),
              end=end, file=self.stream, flush=True)

    def epoch(self, record, epochs):
        self.info(f"epoch {record['epoch']}/{epochs}: train loss {record['train_loss']:.4f}, "
                  f"test loss {record['test_loss']:.4f}, test accuracy "
                  f"{100 * record['test_accuracy']:.2f}%, {record['seconds']:.1f} s, "
                  f"{record['images_per_second']:,.0f} img/s on {record['world_size']} rank(s)")

    def metrics(self, history):
        """Rewrite the JSON-lines file from the whole history (one object per epoch), so a resumed
        run's file matches its checkpoint whatever happened between the two writes; whole or not
        at all, like the checkpoint."""
        if self.metrics_path:
            text = "".join(json.dumps(record) + "\n" for record in history)
            write_bytes(self.metrics_path, text.encode())


def clock(seconds):
    """A duration as a progress bar shows it: "0:07", "12:34", "1:02:03"."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"

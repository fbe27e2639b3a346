"""`ddl launch`: find an mpiexec, start `python -m ddl ...` on N ranks, forward signals.

The mpich wheel puts `mpiexec` beside this interpreter, so a fresh venv needs no system MPI;
a system mpiexec on PATH (or one given with --mpiexec) works too.
"""
import os
import shutil
import signal
import subprocess
import sys


class LaunchError(RuntimeError):
    pass


def find_mpiexec(given=None):
    """`given`, else the mpiexec installed beside this Python, else the first on PATH."""
    if given:
        found = shutil.which(given)
        if not found:
            raise LaunchError(f"--mpiexec {given}: not found or not executable")
        return found
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    found = (beside if os.access(beside, os.X_OK)
             else shutil.which("mpiexec") or shutil.which("mpirun"))
    if not found:
        raise LaunchError("no mpiexec found: `pip install mpich` (or install a system MPI), "
                          "or name one with --mpiexec PATH")
    return found


def _hostfile_flag(mpiexec):
    """Hydra (MPICH, Intel MPI) spells it -f; Open MPI's mpirun spells it --hostfile."""
    out = subprocess.run([mpiexec, "--version"], capture_output=True, text=True).stdout
    return "-f" if "HYDRA" in out.upper() else "--hostfile"


def rank_env(base=None):
    """The ranks' environment: one BLAS thread each (NumPy's elementwise work is single-threaded
    anyway, and two single-threaded ranks beat one two-threaded process)."""
    env = dict(os.environ if base is None else base)
    if sys.stderr.isatty():
        env["DDL_TTY"] = "1"          # rank 0's stderr reaches a terminal through mpiexec's pipes
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")
    return env


def command(nprocs, args, mpiexec, hostfile=None):
    cmd = [mpiexec, "-n", str(nprocs)]
    if hostfile:
        cmd += [_hostfile_flag(mpiexec), hostfile]
    return cmd + [sys.executable, "-m", "ddl", *args]


def launch(nprocs, args, mpiexec=None, hostfile=None):
    """Run `ddl ARGS` on `nprocs` ranks; returns the job's exit status (128+N for signal N)."""
    cmd = command(nprocs, args, find_mpiexec(mpiexec), hostfile)
    proc = subprocess.Popen(cmd, env=rank_env())

    def forward(signum, _frame):
        proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 128 - code if code < 0 else code

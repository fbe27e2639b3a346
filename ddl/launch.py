"""`ddl launch`: find an mpiexec, start `python -m ddl ...` on N ranks, forward signals.

The mpich wheel puts `mpiexec` beside this interpreter, so a fresh venv needs no system MPI;
a system mpiexec on PATH (or one given with --mpiexec) works too.
"""
import os
import re
import shutil
import signal
import subprocess
import sys

from ddl.errors import LaunchError


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


def probe(mpiexec):
    """`mpiexec --version`'s output, which is also the check that `mpiexec` is a launcher that
    runs here: `--mpiexec /bin/false` would otherwise fail the job without a word."""
    try:
        done = subprocess.run([mpiexec, "--version"], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LaunchError(f"{mpiexec}: cannot run it ({e})") from None
    version = (done.stdout + done.stderr).strip()
    if done.returncode or not version:
        said = version.splitlines()[0] if version else "and printed nothing"
        raise LaunchError(f"{mpiexec} does not look like an MPI launcher: `{mpiexec} --version` "
                          f"exited {done.returncode} ({said})")
    return version


_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*$")
_SLOTS = ("slots", "max_slots", "max-slots")


def check_hostfile(path, hydra):
    """Raise LaunchError unless `path` names at least one host and every other line is blank, a
    comment, or `host[:slots] [key=value ...]` (Hydra knows the keys binding and user; Open MPI
    slots, max_slots and more). Hydra's own parser prints an internal trace for a bad line, runs
    locally for an empty file, and spins for ever on `host:-1`."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise LaunchError(f"--hostfile {path}: cannot read it ({e})") from None
    hosts = 0
    for number, line in enumerate(lines, 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        host, colon, slots = words[0].partition(":")
        settings = [word.partition("=") for word in words[1:]]
        if not _HOST.match(host):
            problem = f"{host!r} is not a host name"
        elif colon and not (slots.isdigit() and int(slots) > 0):
            problem = f"slots {slots!r} is not a positive number"
        elif any(not eq or not key or not value for key, eq, value in settings):
            problem = "words after the host must be key=value"
        elif hydra and any(key not in ("binding", "user") for key, _, _ in settings):
            problem = "MPICH's mpiexec takes only binding= and user= after the host"
        elif any(key in _SLOTS and not (value.isdigit() and int(value) > 0)
                 for key, _, value in settings):
            problem = "slots must be a positive number"
        else:
            hosts += 1
            continue
        raise LaunchError(f"--hostfile {path} line {number}: {problem} (in {line.strip()!r})")
    if not hosts:
        raise LaunchError(f"--hostfile {path} lists no hosts")


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
    """The command line of the job; LaunchError if `mpiexec` or the hostfile will not do."""
    version = probe(mpiexec)
    cmd = [mpiexec, "-n", str(nprocs)]
    if hostfile:
        # Hydra (MPICH, Intel MPI) spells it -f; Open MPI's mpirun spells it --hostfile.
        hydra = "HYDRA" in version.upper()
        check_hostfile(hostfile, hydra)
        cmd += ["-f" if hydra else "--hostfile", hostfile]
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

"""`ddl launch --min-ranks M`: after a failed job, which of its hosts are gone, and on which hosts
and how many ranks it goes on (ddl/launch.py runs the job and restarts it).

A host is gone when the watchdog named it (its ranks did not reach a collective: the machine
died, or its link did, or its ranks hang), or when the remote-shell agent cannot reach it within
PROBE_SECONDS (`AGENT HOST true`, as mpiexec would start a process there). The job goes on with
the same global batch on the hosts that remain: every step is the same global batch on any number
of ranks (ddl/data.py's sampler), so the run is the one it would have been, from its checkpoint.
With a host source that is read again before each restart (the hostfile reread, or a discovery
command), a host that answers again is used again.
"""
import re
import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor

PROBE_SECONDS = 10
# The watchdog's line (ddl/watchdog.py): "rank 2 (on n3) did not reach the gradient all-reduce
# of step 34 within 5 s".
_NAMED = re.compile(r"ranks? [\d, ]+ \(on (?P<hosts>[^)]+)\) did not reach (?P<what>.+?) within")
_STEP = re.compile(r" of step (?P<step>[\d,]+)$")


def named_by_watchdog(text, hosts):
    """{host: why} for each of `hosts` that the watchdog named in `text` (the job's stderr). It
    names a host as the host calls itself, perhaps unqualified where the hostfile is not (n3 for
    n3.cluster): a bare name matches."""
    named = {}
    for m in _NAMED.finditer(text):
        for name in m["hosts"].split(", "):
            for host in hosts:
                if _bare(host) == _bare(name):
                    named[host] = f"its ranks did not reach {m['what']}"
    return named


def _bare(host):
    """`host` without its domain; an IPv4 address as it is."""
    return host if re.fullmatch(r"[\d.]+", host) else host.split(".")[0]


def failed_at(text):
    """The step that the watchdog says the job could not finish (the first of those it names),
    or None."""
    for m in _NAMED.finditer(text):
        step = _STEP.search(m["what"])
        if step:
            return int(step["step"].replace(",", ""))
    return None


def _local(host):
    """Whether `host` is this machine, which mpiexec reaches without the agent."""
    return host in ("localhost", socket.gethostname(), socket.getfqdn()) or \
        host.startswith("127.")


def unreachable(hosts, agent):
    """{host: why} for each of `hosts` that the remote shell `agent` (default: ssh) cannot run
    `true` on within PROBE_SECONDS; all probed at once."""
    shell = [agent] if agent else ["ssh", "-o", "BatchMode=yes", "-o",
                                   f"ConnectTimeout={PROBE_SECONDS}"]

    def probe(host):
        try:
            done = subprocess.run([*shell, host, "true"], capture_output=True, text=True,
                                  stdin=subprocess.DEVNULL, timeout=PROBE_SECONDS)
        except subprocess.TimeoutExpired:
            return f"the remote shell got no answer from it within {PROBE_SECONDS} s"
        except OSError as e:
            return f"the remote shell cannot run ({e})"
        said = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        return done.returncode and f"the remote shell cannot reach it ({said})"

    remote = [h for h in dict.fromkeys(hosts) if not _local(h)]
    with ThreadPoolExecutor(max(1, len(remote))) as pool:
        found = dict(zip(remote, pool.map(probe, remote)))
    return {host: why for host, why in found.items() if why}


def slots(hosts):
    """The ranks that `hosts`, [(host, slots or None)], hold: a bare host is one slot."""
    return sum(n or 1 for _, n in hosts)


def regroup(hosts, candidates, stderr, agent, nprocs):
    """After a failed job that ran on `hosts`, [(host, slots or None)]: the hosts to go on with,
    from `candidates` (the same list, or the host source read again), and lines for the log: each
    dropped host and why, each host that is back. Returns (hosts, ranks, lines)."""
    # A host that the watchdog named is gone whatever a probe would say: only the others wait
    # for one (an unreachable host takes the agent's whole connect timeout).
    gone = named_by_watchdog(stderr, [h for h, _ in candidates])
    gone.update(unreachable([h for h, _ in candidates if h not in gone], agent))
    before = {h for h, _ in hosts}
    keep = [(h, n) for h, n in candidates if h not in gone]
    lines = [f"dropping {host}: {why}" for host, why in gone.items() if host in before]
    lines += [f"{host} answers again: using it" for host, _ in keep if host not in before]
    return keep, min(nprocs, slots(keep)), lines

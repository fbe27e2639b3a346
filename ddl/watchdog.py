"""Waiting in a collective: promptly while the others are arriving, asleep while they are not, and
never for ever.

Every collective of `ddl.comm.MPICommunicator` starts nonblocking and ends in `Watchdog.wait`.
MPICH moves a nonblocking collective on only inside MPI calls, and a transfer takes several rounds
once the last rank is there, so a wait first polls, yielding the core between polls, for up to
SPIN seconds: in training the ranks arrive within a few milliseconds of each other, and nearly
every wait ends there, as fast as MPI's blocking call (measured in docs/overheads.md). A longer
wait sleeps between polls, a twentieth of the time waited so far (NAP_MIN to NAP_MAX), and polls
again for RESPIN seconds after each sleep, so a rank waiting for a hung one costs no core, and a
transfer that starts while it sleeps still runs its rounds without a sleep between each.

After `timeout` seconds the rank asks every other rank, on a communicator of its own, how many
collectives it has entered; a rank answers from within its own waits. Those that do not answer
within GRACE seconds did not arrive. One that answers from an earlier collective is waiting there
for them: a collective can complete on some ranks before others have their share (recursive
doubling: a rank's partner sent its part, then stopped), so it is named only when every rank
answered. The lowest rank that answered raises Hung, which ends the job; the rest keep waiting
(and answering) until it does.
"""
import dataclasses
import os
import time

import numpy as np

from ddl.errors import Hung

DEFAULT_TIMEOUT = 300.0
SPIN = 0.02
RESPIN = 0.0002
NAP_MIN, NAP_MAX = 0.0002, 0.05
GRACE = 0.5
_QUERY, _ANSWER = 1, 2


@dataclasses.dataclass(frozen=True)
class Scope:
    """What a wait is given besides its collective: `timeout`, the seconds a rank may wait (0: for
    ever), and `where`, where the job is, for the message when it waits too long (e.g. "of step
    1,204": "rank 3 did not reach the gradient all-reduce of step 1,204 within 300 s")."""
    timeout: float = DEFAULT_TIMEOUT
    where: str = ""


class Watchdog:
    """Waits on the requests of collectives over `comm`, an mpi4py communicator whose ranks run
    on `hosts` (a host name per rank)."""

    def __init__(self, MPI, comm, hosts):
        self.MPI = MPI
        self.comm = comm.Dup()             # its messages never meet the job's
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        # Where each rank runs, to name the host of a rank that does not arrive (its link down).
        self.hosts = hosts
        self.entered = 0                   # collectives this rank has started
        self._asked = 0                    # questions this rank has asked
        self._sends = []                   # (request, buffer) of answers and questions in flight

    def wait(self, request, what, scope=Scope(), at_least=0.0):
        """Return when `request` (this rank's part of the collective `what`, a noun phrase such
        as "gradient all-reduce") has completed. Raises Hung when it has waited longer than
        `scope`'s timeout (0: never), or `at_least` seconds if that is longer, and the ranks that
        did not arrive are known."""
        self.entered += 1
        if request.Test():
            return
        started = time.perf_counter()
        until = started + SPIN
        while time.perf_counter() < until:
            if request.Test():
                return
            os.sched_yield()
        self._sleep_until_done(request, started, scope.timeout and max(scope.timeout, at_least),
                               f"the {what}" + (f" {scope.where}" if scope.where else ""))

    def _sleep_until_done(self, request, started, timeout, what):
        verdict, give_up = None, None
        while True:
            now = time.perf_counter()
            self._answer()
            if timeout and verdict is None and now - started > timeout:
                verdict = self._ask(request)
                if verdict is None:        # it completed while the others answered
                    return
                missing, reporter = verdict
                if reporter == self.rank:
                    raise Hung(_message(what, missing, timeout, self.hosts))
                # The reporter ends the job; should it fail to, this rank does.
                give_up = now + 3 * GRACE
            if give_up and now > give_up:
                raise Hung(_message(what, verdict[0], timeout, self.hosts))
            time.sleep(min(NAP_MAX, max(NAP_MIN, (now - started) / 20)))
            until = time.perf_counter() + RESPIN
            while True:
                if request.Test():
                    return
                if time.perf_counter() > until:
                    break
                os.sched_yield()

    def _send(self, question, value, dest, tag):
        """(the asker's question number, a count) to `dest`, nonblocking."""
        self._sends = [(r, b) for r, b in self._sends if not r.Test()]
        buf = np.array([question, value], np.int64)
        self._sends.append((self.comm.Isend(buf, dest, tag), buf))

    def _answer(self):
        """Tell each rank that asked how many collectives this rank has entered."""
        status, question = self.MPI.Status(), np.empty(2, np.int64)
        while self.comm.Iprobe(self.MPI.ANY_SOURCE, _QUERY, status):
            asker = status.Get_source()
            self.comm.Recv(question, asker, _QUERY)
            self._send(question[0], self.entered, asker, _ANSWER)

    def _ask(self, request):
        """Ask every other rank where it is. Returns None if `request` completed meanwhile, else
        (the ranks that did not arrive, the lowest rank that answered)."""
        self._asked += 1
        for r in range(self.size):
            if r != self.rank:
                self._send(self._asked, self.entered, r, _QUERY)
        heard = {self.rank: self.entered}
        status, answer = self.MPI.Status(), np.empty(2, np.int64)
        until = time.perf_counter() + GRACE
        while len(heard) < self.size and time.perf_counter() < until:
            if request.Test():
                return None
            self._answer()
            while self.comm.Iprobe(self.MPI.ANY_SOURCE, _ANSWER, status):
                source = status.Get_source()
                self.comm.Recv(answer, source, _ANSWER)
                # An answer to an earlier question (one that the collective's completion cut
                # short) says where that rank was then: a rank that has hung since would count.
                if answer[0] == self._asked:
                    heard[source] = int(answer[1])
            time.sleep(0.005)
        if request.Test():
            return None
        silent = [r for r in range(self.size) if r not in heard]
        behind = [r for r, entered in sorted(heard.items()) if entered < self.entered]
        return silent or behind, min(heard)


def _message(what, missing, timeout, hosts):
    """Hung's message: `what` ("the gradient all-reduce of step 1,204") did not complete within
    `timeout` seconds, because of the `missing` ranks; on a job over several `hosts` (each rank's,
    by rank), their hosts are named too."""
    if not missing:
        return f"{what} did not complete within {timeout:g} s, though every rank reached it"
    who = f"rank {missing[0]}" if len(missing) == 1 else f"ranks {', '.join(map(str, missing))}"
    if len(set(hosts)) > 1:
        who += f" (on {', '.join(sorted({hosts[r] for r in missing}))})"
    return f"{who} did not reach {what} within {timeout:g} s"

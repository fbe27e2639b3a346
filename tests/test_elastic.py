"""`ddl launch --min-ranks`: a lost machine does not end the job. First without namespaces: the
watchdog's line read back, the hosts probed through a remote shell, the hosts that go on, the
batches refused up front, the statuses still not restarted. Then on the emulated cluster (its own
nodes el1..el3, beside any other cluster up at the time): one of 3 nodes lost mid-epoch, as a dead
machine (link down, every process killed) and as a partition (link down only), and the job ends
on the 2 others, as accurate as an uninterrupted 2-node run."""
import json
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import rank_env, refused, run_ddl
from ddl import checkpoint, config, elastic, launch, watchdog
from test_multinode import AGENT, SCRIPT, _cannot_make_nodes

PREFIX = os.environ.get("DDL_CLUSTER_PREFIX", "") + "el"   # beside test_multinode's cluster
NODES = [f"{PREFIX}{k}" for k in (1, 2, 3)]
HUNG = watchdog._message("the gradient all-reduce of step 34", [2], 5, ["n1", "n2", "n3"])


@pytest.fixture
def agent(tmp_path, monkeypatch):
    """A remote shell that reaches every host but those in $GONE, failing for those as ssh does."""
    path = tmp_path / "agent"
    path.write_text('#!/bin/sh\ncase " $GONE " in *" $1 "*)\n'
                    '  echo "ssh: connect to host $1 port 22: No route to host" >&2; exit 255;;\n'
                    'esac\n')
    path.chmod(0o755)
    monkeypatch.setenv("GONE", "")
    return str(path)


def test_the_watchdogs_line_names_the_host_and_the_step():
    assert HUNG == "rank 2 (on n3) did not reach the gradient all-reduce of step 34 within 5 s"
    said = f"epoch 1/2 [###...] 30/100\nError: {HUNG}\nAbort(5) on node 0\n"
    # The hostfile may qualify a name that the host gives bare.
    assert elastic.named_by_watchdog(said, ["n1", "n2.cluster", "n3.cluster"]) == {
        "n3.cluster": "its ranks did not reach the gradient all-reduce of step 34"}
    assert elastic.failed_at(said) == 34
    assert elastic.named_by_watchdog("Error: rank 1: disk full", ["n1", "n2"]) == {}
    assert elastic.failed_at("killed") is None


def test_hosts_out_of_the_agents_reach_are_found(agent, monkeypatch):
    monkeypatch.setenv("GONE", "n2 n4")
    gone = elastic.unreachable(["n1", "n2", "n3", "n4", "localhost"], agent)
    assert gone == {h: "the remote shell cannot reach it (ssh: connect to host "
                       f"{h} port 22: No route to host)" for h in ("n2", "n4")}


def test_a_lost_host_is_dropped_and_one_that_is_back_is_used_again(agent, monkeypatch):
    three = [("n1", None), ("n2", None), ("n3", None)]
    monkeypatch.setenv("GONE", "n3")
    hosts, ranks, lines = elastic.regroup(three, three, f"Error: {HUNG}", agent, 3)
    assert (hosts, ranks) == (three[:2], 2)
    assert lines == ["dropping n3: its ranks did not reach the gradient all-reduce of step 34"]
    # Named by the watchdog alone (its ranks hang, the machine answers): dropped too; out of the
    # agent's reach alone (its ranks died with it, unnamed): dropped too.
    monkeypatch.setenv("GONE", "")
    assert elastic.regroup(three, three, HUNG, agent, 3)[:2] == (three[:2], 2)
    monkeypatch.setenv("GONE", "n2")
    assert elastic.regroup(three, three, "killed", agent, 3) == (
        [three[0], three[2]], 2, ["dropping n2: the remote shell cannot reach it (ssh: connect "
                                  "to host n2 port 22: No route to host)"])
    # The hostfile read again: n3 answers again, and -n caps the ranks that its slots add.
    monkeypatch.setenv("GONE", "")
    again = three[:2] + [("n3", 2)]
    hosts, ranks, lines = elastic.regroup(three[:2], again, "", agent, 3)
    assert (hosts, ranks, lines) == (again, 3, ["n3 answers again: using it"])


def _attempts(monkeypatch, *results):
    """launch._run replaced by one that returns `results` in turn; the calls go in the list
    returned."""
    calls = []

    def attempt(nprocs, args, hostfile=None, **where):
        calls.append((nprocs, list(hostfile) if isinstance(hostfile, list) else hostfile, args))
        return results[len(calls) - 1]
    monkeypatch.setattr(launch, "_run", attempt)
    return calls


def test_the_job_goes_on_on_the_hosts_that_remain(agent, monkeypatch, tmp_path, capsys):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("n1\nn2\nn3\n")
    monkeypatch.setenv("GONE", "n3")
    calls = _attempts(monkeypatch, (5, False, f"Error: {HUNG}\n"), (0, False, ""))
    args = ["train", "--batch-size", "120", "--checkpoint", str(tmp_path / "c.h5")]
    assert launch.launch(3, args, hostfile=str(hostfile), max_restarts=2, agent=agent,
                         min_ranks=2) == 0
    assert [(n, hosts) for n, hosts, _ in calls] == [
        (3, [("n1", None), ("n2", None), ("n3", None)]), (2, [("n1", None), ("n2", None)])]
    err = capsys.readouterr().err
    assert "ddl launch: dropping n3: its ranks did not reach the gradient all-reduce" in err
    assert "ddl launch: 2 rank(s) go on, on n1, n2, with the same global batch" in err
    assert "work lost: every step so far (no checkpoint yet)" in err


@pytest.mark.parametrize("source", ["reread", "discovery"])
def test_a_host_that_is_back_is_used_at_the_next_restart(source, agent, monkeypatch, tmp_path,
                                                         capsys):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("n1\nn2\nn3\n")
    monkeypatch.setenv("GONE", "n3")
    calls = _attempts(monkeypatch, (5, False, f"Error: {HUNG}\n"), (1, False, "killed\n"),
                      (0, False, ""))
    original = launch._run

    def attempt(*a, **k):                     # n3 back after the first restart
        monkeypatch.setenv("GONE", "" if calls else "n3")
        return original(*a, **k)
    monkeypatch.setattr(launch, "_run", attempt)
    given = (dict(hostfile=str(hostfile), reread=True) if source == "reread" else
             dict(discovery=f"cat {hostfile}"))
    args = ["train", "--batch-size", "120", "--checkpoint", str(tmp_path / "c.h5")]
    assert launch.launch(3, args, max_restarts=2, agent=agent, min_ranks=2, **given) == 0
    assert [n for n, _, _ in calls] == [3, 2, 3]
    assert "ddl launch: n3 answers again: using it" in capsys.readouterr().err


def test_fewer_ranks_than_the_minimum_end_the_job(agent, monkeypatch, tmp_path, capsys):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("n1\nn2\nn3\n")
    monkeypatch.setenv("GONE", "n2 n3")
    calls = _attempts(monkeypatch, (5, False, ""), (0, False, ""))
    args = ["train", "--batch-size", "120", "--checkpoint", str(tmp_path / "c.h5")]
    assert launch.launch(3, args, hostfile=str(hostfile), max_restarts=2, agent=agent,
                         min_ranks=2) == 5
    assert len(calls) == 1
    assert "1 rank(s) left, fewer than --min-ranks 2: giving up" in capsys.readouterr().err


@pytest.mark.parametrize("code", [2, 3, 4, 130, 143])
def test_a_usage_error_divergence_or_signal_is_still_not_restarted(code, agent, monkeypatch,
                                                                   tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("n1\nn2\nn3\n")
    calls = _attempts(monkeypatch, (code, False, f"Error: {HUNG}"), (0, False, ""))
    args = ["train", "--batch-size", "120", "--checkpoint", str(tmp_path / "c.h5")]
    assert launch.launch(3, args, hostfile=str(hostfile), max_restarts=2, agent=agent,
                         min_ranks=2) == code
    assert len(calls) == 1


def test_the_work_lost_is_the_steps_since_the_checkpoint(tmp_path):
    path = tmp_path / "c.h5"
    checkpoint.save(path, dict(
        model={"w": np.zeros(2, np.float32)}, architecture={}, optimizer={},
        schedule=dict(last_epoch=30, base_lr=0.1), epoch=0, step=30, partial={}, history=[],
        config={}, data={}, world_size=3))
    assert launch._work_lost(str(path), 34) == (
        f"work lost: 3 steps, 31 to 33, done since {path} was saved at step 30, and step 34, "
        "which did not finish")
    assert launch._work_lost(str(path), 32).startswith("work lost: step 31 done since")
    assert launch._work_lost(str(path), None) == (
        f"work lost: the steps after step 30, where {path} was saved")


def test_a_batch_that_a_smaller_world_does_not_divide_is_refused_up_front(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("n1\nn2\nn3\n")
    done = run_ddl(["launch", "-n", "3", "--hostfile", hostfile, "--max-restarts", "1",
                    "--min-ranks", "2", "--", "train", "--checkpoint", tmp_path / "c.h5"])
    refused((done.returncode, done.stderr), 2, "--batch-size 128", "does not divide by 3 rank(s)",
            "--min-ranks 2 and -n 3", "it serves 2", "126 or 132 would serve 2, 3 rank(s)")
    assert not (tmp_path / "c.h5").exists()
    config.check_batch(120, [2, 3])                   # 120 serves both


@pytest.mark.parametrize("options, words", [
    (["--min-ranks", "2"], "--min-ranks needs --max-restarts N"),
    (["--max-restarts", "1", "--min-ranks", "4"], "--min-ranks 4 is more than the 3 ranks"),
    (["--max-restarts", "1", "--hosts-file-reread"], "need --min-ranks"),
    (["--max-restarts", "1", "--min-ranks", "2", "--host-discovery-script", "true"],
     "--hostfile FILE or --host-discovery-script CMD (one of them)")])
def test_elastic_options_that_cannot_work_are_refused(options, words, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("n1:1\nn2:1\nn3:1\n")
    done = run_ddl(["launch", "-n", "3", "--hostfile", hostfile, *options, "--", "train",
                    "--batch-size", "120", "--checkpoint", tmp_path / "c.h5"])
    refused((done.returncode, done.stderr), 2, words)


def test_a_discovery_script_gives_the_hosts(tmp_path):
    assert launch.discover_hosts("printf 'n1:2\\nn2\\n'") == [("n1", 2), ("n2", None)]
    with pytest.raises(launch.LaunchError, match="--host-discovery-script exit 3: exit status 3"):
        launch.discover_hosts("exit 3")


# On the emulated cluster -------------------------------------------------------------------

CANNOT = _cannot_make_nodes(PREFIX)
TIMEOUT = 3                 # --timeout: how soon the watchdog gives a lost node up
EVERY = 10                  # --checkpoint-every


@pytest.fixture(scope="module")
def cluster():
    """el1..el3 at 1 Gbit/s, taken down (with any process left on a node) whatever happens,
    once up: a refused `up` (such a cluster is up already) leaves the one that is up alone."""
    env = dict(os.environ, DDL_CLUSTER_PREFIX=PREFIX)
    up = subprocess.run([SCRIPT, "up", "3", "1gbit"], capture_output=True, text=True, env=env)
    assert up.returncode == 0, up.stderr
    try:
        yield
    finally:
        subprocess.run([SCRIPT, "down"], capture_output=True, env=env)


class Job:
    """`ddl launch` on el1 over the first `n` nodes, its stderr lines read as they come, each
    with the time it came."""

    def __init__(self, n, tmp_path, args, *elastic_options):
        hosts = tmp_path / "hosts"
        hosts.write_text("".join(f"{node}\n" for node in NODES[:n]))
        self.lines, self.started = [], time.monotonic()
        self.proc = subprocess.Popen(
            [str(SCRIPT), "exec", NODES[0], sys.executable, "-m", "ddl", "launch", "-n", str(n),
             "--hostfile", str(hosts), "--agent", str(AGENT), "--iface", "eth0",
             *elastic_options, "--", *map(str, args)],
            env=dict(rank_env(), DDL_CLUSTER_PREFIX=PREFIX), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append((time.monotonic(), line))

    def end(self, timeout=180):
        """The exit status and the whole of stderr."""
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        self.reader.join(timeout=5)
        return self.proc.returncode, "".join(line for _, line in self.lines)

    def when(self, start):
        """When the first line starting `start` came, or None."""
        return next((t for t, line in self.lines if line.startswith(start)), None)


def run_args(mnist_h5, folder):
    """400 steps of the mlp (2 epochs of 200 steps of 120 images: 40 per rank on 3, 60 on 2):
    the node is lost in the first epoch, and the second runs whole on 2 nodes."""
    return ["train", "--data", mnist_h5, "--model", "mlp", "--subset", "24000", "--batch-size",
            "120", "--epochs", "2", "--checkpoint", folder / "c.h5", "--checkpoint-every", EVERY,
            "--timeout", TIMEOUT, "--metrics", folder / "m.jsonl", "--timeline", folder / "t.json"]


def history(folder):
    return [json.loads(line) for line in (folder / "m.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_nodes(cluster, mnist_h5, tmp_path_factory):
    """The uninterrupted run on 2 nodes: (its history, its start-up in seconds, up to the line
    that describes the run)."""
    folder = tmp_path_factory.mktemp("two")
    job = Job(2, folder, run_args(mnist_h5, folder))
    code, err = job.end()
    assert code == 0, err
    return history(folder), job.when("mlp for") - job.started


def _kill_all(node):
    """kill -9 every process on `node`."""
    pids = subprocess.run(["ip", "netns", "pids", node], capture_output=True, text=True)
    for pid in pids.stdout.split():
        try:
            os.kill(int(pid), 9)
        except ProcessLookupError:
            pass


@pytest.mark.skipif(bool(CANNOT), reason=CANNOT)
@pytest.mark.parametrize("how", ["dead-machine", "partition"])
def test_a_node_lost_mid_epoch_does_not_end_the_job(how, two_nodes, mnist_h5, tmp_path):
    """el3 is lost after the first checkpoint: the job ends 0 on el1 and el2, from the checkpoint,
    as accurate as the uninterrupted 2-node run; the time from the loss to training again is the
    watchdog's --timeout, the probe, and a restart."""
    reference, startup = two_nodes
    job = Job(3, tmp_path, run_args(mnist_h5, tmp_path), "--max-restarts", "2",
              "--min-ranks", "2")
    while not (tmp_path / "c.h5").exists():
        assert job.proc.poll() is None, job.end()
        time.sleep(0.05)
    # A few steps after the first checkpoint (step 10), far from the epoch's end at step 200:
    # on a quiet machine a step takes about 5 ms, and 1 s reached the end of the epoch.
    time.sleep(0.2)
    try:
        subprocess.run(["ip", "-n", NODES[2], "link", "set", "eth0", "down"], check=True)
        if how == "dead-machine":
            _kill_all(NODES[2])
        cut = time.monotonic()
        code, err = job.end()
    finally:                                    # el3 back, bare, for the next test
        _kill_all(NODES[2])
        subprocess.run(["ip", "-n", NODES[2], "link", "set", "eth0", "up"], check=True)
    assert code == 0, err
    assert f"ddl launch: dropping {NODES[2]}: its ranks did not reach" in err
    assert f"2 rank(s) go on, on {NODES[0]}, {NODES[1]}" in err
    lost = re.search(r"work lost: (step [\d,]+|(\d+) steps|no step)", err)
    assert lost and int(lost[2] or lost[1].startswith("step")) < EVERY, err
    resumed = job.when("resuming ")
    assert resumed, err
    took = resumed - cut
    records = history(tmp_path)
    accuracy, want = records[-1]["test_accuracy"], reference[-1]["test_accuracy"]
    named, failed = job.when("Error: rank 2"), job.when("ddl launch: the job failed")
    print(f"\n{how}: {took:.1f} s from the loss to training again (the watchdog "
          f"{named - cut:.1f} s, the job's end and the probes {failed - named:.1f} s, the "
          f"restart {resumed - failed:.1f} s; --timeout {TIMEOUT}, start-up {startup:.1f} s); "
          f"{lost[0]}; accuracy {100 * accuracy:.2f}% against {100 * want:.2f}% uninterrupted "
          "on 2 nodes")
    assert abs(accuracy - want) <= 0.002
    # The metrics show the change: an epoch that ran on both sizes lists them.
    sizes = [w for r in records for w in r.get("world_sizes", [r["world_size"]])]
    assert sizes[0] == 3 and sizes[-1] == 2 and sorted(sizes, reverse=True) == sizes, records
    # And the timeline, which covers the run since the restart.
    marks = [e["name"] for e in json.loads((tmp_path / "t.json").read_text())["traceEvents"]
             if e["ph"] == "i"]
    assert len(marks) == 1 and re.fullmatch(r"resumed at step [\d,]+ on 2 rank\(s\), after 3 "
                                            r"rank\(s\)", marks[0]), marks
    assert marks[0] in err
    # The watchdog's timeout and its grace, the agent's 3 s connect timeout, a restart (with
    # slack for a machine shared with other work).
    assert took <= TIMEOUT + 1 + 3 + 2 * startup + 5, err

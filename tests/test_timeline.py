"""`ddl train --timeline`: a trace-event file that Perfetto and chrome://tracing load (one track
per rank, each step a slice holding its phases), and the summary that names a straggler."""
import json

import numpy as np

from conftest import run_ddl
from ddl.timeline import KINDS, summary, trace

STEP = ("data", "forward", "backward", "wait", "all-reduce", "optimizer")


def laps(*phases):
    """(k, 3) laps of back-to-back phases given as (kind, seconds)."""
    rows, t = [], 0.0
    for kind, seconds in phases:
        rows.append((KINDS.index(kind), t, t + seconds))
        t += seconds
    return np.array(rows)


def test_trace_nests_each_step_and_numbers_it_from_the_first():
    one = laps(*[(k, 0.001) for k in STEP], ("checkpoint", 0.002), *[(k, 0.001) for k in STEP],
               ("evaluation", 0.003))
    events = trace([(one, "node1", 11), (one, "node2", 12)], first_step=40)["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert names == {0: "rank 0 (node1, pid 11)", 1: "rank 1 (node2, pid 12)"}
    track = [e for e in events if e["ph"] == "X" and e["tid"] == 1]
    assert [e["name"] for e in track] == ["step 41", *STEP, "checkpoint", "step 42", *STEP,
                                          "evaluation"]
    step = track[0]
    assert step["ts"] == track[1]["ts"] and step["dur"] == 6000          # microseconds
    assert {e["cat"] for e in track} == {"step", "data", "compute", "waiting", "communication",
                                         "checkpoint", "evaluation"}


def test_summary_names_the_rank_the_others_waited_for():
    fast = laps(("forward", 1.0), ("wait", 0.5), ("all-reduce", 0.1))
    slow = laps(("forward", 1.5), ("wait", 0.0), ("all-reduce", 0.1))
    lines = summary([fast, slow, fast], "t.json")
    assert lines[0] == "timeline t.json: seconds per rank"
    assert lines[1].split() == ["rank", "compute", "communication", "waiting", "data",
                                "evaluation", "checkpoint"]
    assert lines[3].split() == ["1", "1.50", "0.10", "0.00", "0.00", "0.00", "0.00"]
    assert lines[-1].startswith("rank 1 is the slowest")
    assert not summary([fast, fast], "t.json")[-1].startswith("rank")      # no straggler


def test_a_two_rank_run_writes_a_trace_with_a_track_per_rank(small_h5, tmp_path):
    path = tmp_path / "t.json"
    done = run_ddl(["train", "--data", small_h5, "--model", "mlp", "--subset", "512",
                    "--batch-size", "64", "--epochs", "1", "--checkpoint", tmp_path / "c.h5",
                    "--checkpoint-every", "3", "--timeline", path], n=2)
    assert done.returncode == 0, done.stderr
    assert f"timeline {path}: seconds per rank" in done.stderr
    data = json.loads(path.read_text())
    assert data["displayTimeUnit"] == "ms"
    events = data["traceEvents"]
    assert {e["tid"] for e in events if e["name"] == "thread_name"} == {0, 1}
    for rank in (0, 1):
        track = [e for e in events if e["ph"] == "X" and e["tid"] == rank]
        assert all(e["pid"] == 0 and e["dur"] >= 0 and isinstance(e["ts"], float)
                   for e in track)
        steps = [e for e in track if e["cat"] == "step"]
        assert [e["name"] for e in steps] == [f"step {i}" for i in range(1, 9)]
        phases = [e for e in track if e["cat"] != "step"]
        assert {e["name"] for e in phases} == set(KINDS)
        assert all(a["ts"] + a["dur"] <= b["ts"] + 1e-3 for a, b in zip(phases, phases[1:]))
        for step in steps:                                  # each phase inside its step
            inside = [e for e in phases if step["ts"] <= e["ts"]
                      and e["ts"] + e["dur"] <= step["ts"] + step["dur"] + 1e-3]
            assert [e["name"] for e in inside] == list(STEP)


def test_the_summary_names_the_layers_without_compiled_kernels(tmp_path):
    from ddl import kernels, nn
    from ddl.comm import SingleCommunicator
    from ddl.timeline import Timeline
    from ddl.state import slow_layers
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten())
    with kernels.using("numba"):
        slow = slow_layers(net)
    assert slow == ["1 (Tanh)"]
    comm = SingleCommunicator()
    timeline = Timeline(comm, slow)
    timeline.lap("forward")
    lines = timeline.write(comm, str(tmp_path / "t.json"), 0)
    assert lines[-1].endswith("(the slow steps of forward and backward): 1 (Tanh)")
    with kernels.using("numpy"):
        assert slow_layers(net) == []

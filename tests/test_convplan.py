"""The convolution algorithms chosen by measurement (ddl/kernels/convplan.py): the fastest of
(fake) timings wins, the choice is stored and found again, every rank runs rank 0's plan, and a
plan or a forced name changes which algorithm runs. That each algorithm gives the reference's
results is tested in test_kernels.py (test_each_algorithm_that_fits_matches_numpy)."""
import json
import time
from pathlib import Path

import numpy as np
import pytest

from ddl import kernels, nn
from ddl.errors import UsageError
from ddl.kernels import convplan, jit, tune
from ddl.step import rehearse

A = convplan.Conv((8, 4, 3, 3), (1, 1), (1, 1), (2, 4, 6, 6), "float32")
B = convplan.Conv((8, 8, 3, 3), (1, 1), (1, 1), (2, 8, 3, 3), "float32", pool=True)


def fake(seconds, ran=None):
    """(trial, clock): run(name) moves the clock on by seconds[conv][name] (a list: one value per
    call, the last repeated), and appends (conv, name) to `ran`."""
    now, calls = [0.0], {}

    def trial(conv, input_grad):
        def run(name):
            times = seconds[conv][name]
            i = calls[conv, name] = calls.get((conv, name), -1) + 1
            now[0] += times[min(i, len(times) - 1)]
            if ran is not None:
                ran.append((conv, name))
        return run
    return trial, lambda: now[0]


def test_the_fastest_median_wins_ties_to_the_first():
    # The first call is untimed (compiles), then 5 rounds: medians gemm 3, direct 2, winograd 2
    # (gemm and winograd timed twice only: after 2 rounds, over 1.5 times direct's best; of two
    # times the lower counts).
    seconds = {A: dict(gemm=[9, 3, 4], direct=[9, 1, 1, 50, 2, 3, 0.5], winograd=[0, 2])}
    trial, clock = fake(seconds)
    got = convplan.decide({A: True}, lambda conv: ["gemm", "direct", "winograd"], trial, clock)
    assert got == {A: ("direct", dict(gemm=3, direct=2, winograd=2))}


def test_far_slower_candidates_are_dropped_and_a_lone_one_is_not_timed():
    ran = []
    trial, clock = fake({A: dict(gemm=[1], direct=[1.6]), B: dict(direct=[1])}, ran)
    got = convplan.decide({B: False, A: True},          # the lone one first
                          lambda conv: ["gemm", "direct"] if conv == A else ["direct"],
                          trial, clock)
    assert got[A][0] == "gemm" and got[B] == ("direct", {})
    assert ran.count((A, "direct")) == 1 + convplan.PRUNE_AFTER
    assert ran.count((A, "gemm")) == 1 + convplan.ROUNDS and (B, "direct") not in ran


def test_a_candidate_at_most_one_and_a_half_times_the_best_after_two_rounds_stays():
    ran = []
    trial, clock = fake({A: dict(gemm=[2], direct=[3], winograd=[3.5])}, ran)
    got = convplan.decide({A: True}, lambda conv: ["gemm", "direct", "winograd"], trial, clock)
    assert got == {A: ("gemm", dict(gemm=2, direct=3, winograd=3.5))}
    # one untimed call each, then 5 rounds, winograd's cut after 2
    assert [ran.count((A, name)) for name in ("gemm", "direct", "winograd")] == [6, 6, 3]


def conv_rehearsal(*convs):
    """A rehearse() that reports `convs` as conv2d_forward and conv2d_backward would."""
    def rehearse():
        for conv in convs:
            convplan.note(conv)
            convplan.note(conv, input_grad=True)
    return rehearse


@pytest.fixture
def store(tmp_path, monkeypatch):
    """The plans stored in a file of tmp_path under key "cpu X"."""
    path = str(tmp_path / "convs.json")
    monkeypatch.setattr(convplan, "_where", lambda target=None: ([path], "cpu X"))
    return path


def test_the_plan_is_stored_and_read_back(store):
    ran = []
    seconds = {A: dict(gemm=[2], direct=[1]), B: dict(direct=[1], winograd=[3])}
    trial, clock = fake(seconds, ran)
    plan, timed = convplan.measure(conv_rehearsal(A), lambda c: list(seconds[c]), trial, print,
                                   clock)
    assert plan == {A: "direct"} and timed == 1 and ran
    entry = json.load(open(store))["cpus"]["cpu X"][str(A)]
    assert entry == dict(algorithm="direct", ms=dict(gemm=2000.0, direct=1000.0))
    ran.clear()
    plan, timed = convplan.measure(conv_rehearsal(A, B), lambda c: list(seconds[c]), trial, print,
                                   clock)
    assert plan == {A: "direct", B: "direct"} and timed == 1   # only B timed now
    assert {conv for conv, _ in ran} == {B}
    assert convplan.stored()[2].keys() == {str(A), str(B)}


def test_a_damaged_plan_file_is_said_and_timed_again(store, capsys):
    open(store, "w").write("{not json")
    seconds = {A: dict(gemm=[2], direct=[1])}
    trial, clock = fake(seconds)
    plan, _ = convplan.measure(conv_rehearsal(A), lambda c: list(seconds[c]), trial, None, clock)
    assert plan == {A: "direct"}
    assert "ignoring the kernel tuning file" in capsys.readouterr().err
    assert json.load(open(store))["cpus"]["cpu X"][str(A)]["algorithm"] == "direct"


class Rank1:
    """Rank 1 of 2, whose rank 0 found `plan`."""
    rank, size = 1, 2

    def __init__(self, plan):
        self.plan = plan

    def barrier(self, what, at_least=0.0):
        pass

    def allgather_obj(self, obj, what):
        return [None, obj]

    def bcast_obj(self, obj, what):
        assert obj is None
        return self.plan


def test_other_ranks_run_rank_0s_plan_without_timing(monkeypatch):
    monkeypatch.setattr(convplan, "_chosen", {})
    with kernels.using("numba"):
        assert kernels.choose(lambda: pytest.fail("rank 1 rehearsed"), Rank1({A: "gemm"}))[0] == 1
    assert convplan.chosen(A) == "gemm"


def test_choose_plans_what_a_training_step_runs(store, monkeypatch):
    """Rank 0 alone: the shapes that rehearse runs (both micro-batch sizes of a step), timed."""
    monkeypatch.setattr(convplan, "_chosen", {})
    with kernels.using("numba"):
        model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, rng=0), nn.BatchNorm2d(4), nn.ReLU(),
                              nn.Conv2d(4, 4, 3, rng=1), nn.MaxPool2d(2), nn.Flatten(),
                              nn.Linear(36, 3, rng=2))
        model[0].needs_input_grad = False
        model.eval()(np.zeros((1, 1, 8, 8), np.float32))   # run before: holds its backend
        before = model.state_dict()
        started = time.perf_counter()
        planned, seconds = kernels.choose(lambda: rehearse(model, (1, 8, 8), 5, 3))
    assert planned == 4                           # 2 layers x micro-batches of 3 and 2
    assert 0 < seconds <= time.perf_counter() - started       # the time it took, as said
    # The model rehearsed is the one that trains: left as it was, gradients zero.
    after = model.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert not any(p.grad.any() for p in model.parameters())
    shapes = convplan.stored()[2]
    first = convplan.Conv((4, 1, 3, 3), (1, 1), (1, 1), (3, 1, 8, 8), "float32")
    assert str(first) + " -input grad" in shapes
    assert convplan.chosen(first) == shapes[str(first) + " -input grad"]["algorithm"]
    pooled = convplan.Conv((4, 4, 3, 3), (1, 1), (0, 0), (2, 4, 8, 8), "float32", True)
    assert set(shapes[str(pooled)]["ms"]) <= {"direct", "winograd"}    # only those fuse


def test_the_numpy_kernels_plan_nothing():
    with kernels.using("numpy"):
        assert kernels.choose(lambda: pytest.fail("rehearsed")) == (0, 0.0)


def layer_ran(conv, x):
    """The algorithm that conv2d_forward runs for layer `conv` on x."""
    with kernels.using("numba"):
        conv(x)
    return conv._ctx[0]


def test_the_adopted_plan_then_a_forced_name_decide(monkeypatch):
    monkeypatch.setattr(convplan, "_chosen", {})
    conv, x = nn.Conv2d(4, 8, 3, padding=1, rng=0), np.zeros((2, 4, 6, 6), np.float32)
    assert layer_ran(conv, x) == "direct"                  # the fixed rule
    convplan.adopt({A: "winograd"})
    assert layer_ran(conv, x) == "winograd"
    assert layer_ran(conv, x[:1]) == "direct"              # a shape not planned: the rule
    monkeypatch.setenv(convplan.FORCE, "gemm")
    assert layer_ran(conv, x) == "gemm"
    monkeypatch.setenv(convplan.FORCE, "fft")
    with pytest.raises(UsageError, match="DDL_CONV_ALGORITHM='fft' is not a convolution "
                                         "algorithm .choose from gemm, direct, winograd"):
        layer_ran(conv, x)
    with kernels.using("numba"), pytest.raises(UsageError):
        kernels.choose(lambda: None)


def test_a_forced_name_that_does_not_fit_leaves_the_choice(monkeypatch):
    monkeypatch.setenv(convplan.FORCE, "winograd")
    strided = nn.Conv2d(4, 8, 3, stride=2, rng=0)
    assert layer_ran(strided, np.zeros((2, 4, 7, 7), np.float32)) == "strided"   # the rule's


def test_every_rank_runs_rank_0s_plan(tmp_path):
    """A real 2-rank job: rank 0 alone rehearses (and times, unless stored), both run its plan."""
    from conftest import run_mpi
    done = run_mpi(2, [Path(__file__).with_name("mpi_jobs.py"), "plan", tmp_path])
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"plan{r}.json").read_text()) for r in (0, 1)]
    assert [r["rehearsals"] for r in ranks] == [1, 0]
    assert len(ranks[0]["plan"]) == 2 and ranks[1]["plan"] == ranks[0]["plan"]


def test_the_times_are_stored_in_milliseconds_to_four_places(store):
    trial, clock = fake({A: dict(gemm=[0.002], direct=[0.00123456])})
    convplan.measure(conv_rehearsal(A), lambda c: ["gemm", "direct"], trial, print, clock)
    entry = json.load(open(store))["cpus"]["cpu X"][str(A)]
    assert entry["ms"] == dict(gemm=2.0, direct=1.2346)


def test_the_plan_is_written_to_the_first_file_and_found_in_the_others(tmp_path, monkeypatch):
    first, other = str(tmp_path / "first.json"), str(tmp_path / "other.json")
    monkeypatch.setattr(convplan, "_where", lambda target=None: ([first, other], "cpu X"))
    trial, clock = fake({A: dict(gemm=[2], direct=[1])})
    convplan.measure(conv_rehearsal(A), lambda c: ["gemm", "direct"], trial, print, clock)
    assert Path(first).exists() and not Path(other).exists()
    Path(first).rename(other)
    assert convplan.stored()[0] == other and str(A) in convplan.stored()[2]


def test_the_timing_locks_the_file_it_writes(tmp_path, monkeypatch):
    """Beside the first file, the one written: a later base's folder may not exist yet, and
    where the lock file cannot be made there is no lock (two processes would both time)."""
    import contextlib
    first, other = str(tmp_path / "first.json"), str(tmp_path / "not-made" / "other.json")
    monkeypatch.setattr(convplan, "_where", lambda target=None: ([first, other], "cpu X"))
    locks = []
    monkeypatch.setattr(tune, "locked", lambda path: locks.append(path) or contextlib.nullcontext())
    trial, clock = fake({A: dict(gemm=[2], direct=[1])})
    convplan.measure(conv_rehearsal(A), lambda c: ["gemm", "direct"], trial, print, clock)
    assert locks == [first + ".lock"]


def test_damaged_stored_choices_are_left_out(store):
    def holding(entries):
        Path(store).write_text(json.dumps(dict(version=jit.version(), cpus={"cpu X": entries})))
        return convplan.stored()
    assert holding(["direct"]) == (None, "cpu X", {})
    good = {"algorithm": "direct"}
    assert holding({str(A): {"ms": {}}, str(B): good, "C": "gemm"}) == (store, "cpu X",
                                                                         {str(B): good})


def test_forget_removes_this_cpus_choices_from_every_file(tmp_path, monkeypatch):
    files = [str(tmp_path / "a.json"), str(tmp_path / "b.json"), str(tmp_path / "c.json")]
    monkeypatch.setattr(jit, "choice_files", lambda kind: files)
    monkeypatch.setattr(tune, "cpu_key", lambda: "cpu X")
    mine, other = {"algorithm": "direct"}, {"algorithm": "gemm"}
    tune.write(files[0], jit.version(), {"cpu X for a, 1 BLAS thread(s)": mine,
                                         "cpu X for b, 2 BLAS thread(s)": mine,
                                         "cpu Y for a, 1 BLAS thread(s)": other})
    tune.write(files[1], jit.version(), {"cpu X for a, 1 BLAS thread(s)": mine})
    assert convplan.forget() == 3
    assert tune.read(files[0], jit.version(), print) == {"cpu Y for a, 1 BLAS thread(s)": other}
    assert tune.read(files[1], jit.version(), print) == {}
    assert not Path(files[2]).exists() and convplan.forget() == 0


@pytest.mark.parametrize("pools, threads", [
    ([dict(user_api="blas", num_threads=2), dict(user_api="openmp", num_threads=8)], 2),
    ([dict(user_api="openmp", num_threads=8)], 1)])
def test_the_key_counts_the_blas_threads_only(pools, threads, monkeypatch):
    monkeypatch.setattr(convplan, "threadpool_info", lambda: pools)
    assert convplan._where()[1].endswith(f", {threads} BLAS thread(s)")


def test_the_key_names_the_cpu_name_compiled_for_unless_told(monkeypatch):
    monkeypatch.setattr(tune, "cpu_key", lambda: "cpu X")
    monkeypatch.setattr(convplan, "threadpool_info", lambda: [])
    assert convplan._where()[1] == f"cpu X for {jit.target()}, 1 BLAS thread(s)"
    assert convplan._where("haswell")[1] == "cpu X for haswell, 1 BLAS thread(s)"

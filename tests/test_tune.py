"""The per-CPU choice of the CPU name that numba compiles the kernels for (ddl/kernels/tune.py):
measured once per CPU model and kernel version, remembered, overridden by $NUMBA_CPU_NAME, robust
to a damaged choice file; and the kernels compiled for another CPU name agree with the NumPy
reference. The timings are faked where the logic is what is tested."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from ddl.kernels import convplan, jit, tune

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST, OTHERS = "hostcpu", ["fastcpu", "slowcpu"]


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """(paths, measured, log): choice files in tmp_path, the names a fake measurement was asked
    for (one list per measurement), and the lines logged; the fake makes "fastcpu" 20% faster."""
    monkeypatch.delenv(tune.EXPLICIT, raising=False)
    monkeypatch.setattr(tune, "candidates", lambda: [HOST, *OTHERS])
    measured, lines = [], []

    def measure(names):
        measured.append(list(names))
        speed = {HOST: 1.0, "fastcpu": 0.8, "slowcpu": 1.5}
        return {n: {"ref-cnn": 2e-4 * speed[n], "seed-cnn": 1e-4 * speed[n]} for n in names}
    return [str(tmp_path / "a.json"), str(tmp_path / "b.json")], measure, measured, lines


def choose(fake, version="v1", key="cpu A"):
    paths, measure, _, lines = fake
    return tune.target(paths, version, key=key, measure_fn=measure, log=lines.append)


def test_the_fastest_is_chosen_once_and_remembered(fake):
    paths, _, measured, lines = fake
    assert choose(fake) == "fastcpu"
    assert choose(fake) == "fastcpu"
    assert measured == [[HOST, *OTHERS]]                 # measured once
    stored = json.loads(open(paths[0]).read())
    assert stored["version"] == "v1" and stored["cpus"]["cpu A"]["target"] == "fastcpu"
    assert len(lines) == 1 and "measuring" in lines[0]


def test_another_cpu_model_or_version_measures_again(fake):
    paths, _, measured, _ = fake
    choose(fake)
    choose(fake, key="cpu B")
    assert len(measured) == 2
    assert set(json.loads(open(paths[0]).read())["cpus"]) == {"cpu A", "cpu B"}  # both kept
    choose(fake, version="v2")
    assert len(measured) == 3
    assert json.loads(open(paths[0]).read())["version"] == "v2"
    choose(fake, version="v2")
    assert len(measured) == 3


def test_a_choice_in_another_cache_base_is_used(fake):
    paths, _, measured, _ = fake
    tune.write(paths[1], "v1", {"cpu A": dict(target="slowcpu")})
    assert choose(fake) == "slowcpu" and measured == []


def test_the_host_name_stays_unless_clearly_beaten(fake, monkeypatch):
    paths, _, _, lines = fake
    monkeypatch.setattr(tune, "candidates", lambda: [HOST, "slowcpu"])
    assert choose(fake) == HOST
    within_noise = {HOST: {"m": 1.0}, "fastcpu": {"m": 1 / (1 + tune.MARGIN / 2)}}
    assert tune.decide(lambda _: within_noise, lines.append)["target"] == HOST


def test_explicit_numba_cpu_name_wins(fake, monkeypatch):
    paths, _, measured, _ = fake
    choose(fake)
    monkeypatch.setenv(tune.EXPLICIT, "haswell")
    assert choose(fake) == "haswell"
    assert choose(fake, key="a CPU never measured") == "haswell" and len(measured) == 1


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00", b"[1, 2]",
                                     b'{"version": "v1", "cpus": {"cpu A": {"target": 5}}}',
                                     b'{"version": "v1", "cpus": []}', b""])
def test_a_damaged_choice_file_is_replaced_with_one_line(fake, content):
    paths, _, measured, lines = fake
    with open(paths[0], "wb") as f:
        f.write(content)
    assert choose(fake) == "fastcpu" and len(measured) == 1
    assert len([line for line in lines if "measuring" not in line]) <= 1
    assert all("\n" not in line and "Traceback" not in line for line in lines)
    assert json.loads(open(paths[0]).read())["cpus"]["cpu A"]["target"] == "fastcpu"  # rebuilt
    assert choose(fake) == "fastcpu" and len(measured) == 1


def test_an_unreadable_unwritable_choice_file_costs_lines_not_errors(fake):
    paths, _, measured, lines = fake
    os.mkdir(paths[0])                              # unreadable as a file, and cannot be replaced
    assert choose(fake) == "fastcpu"
    assert [line.split(" (")[0] for line in lines] == [
        f"ddl: ignoring the kernel tuning file {paths[0]}",
        "ddl: measuring which CPU tuning makes the kernels fastest on this machine",
        f"ddl: cannot store the kernel tuning in {paths[0]}"]


def test_a_failed_measurement_keeps_the_host_name_and_says_so(fake):
    paths, _, _, lines = fake

    def broken(names):
        raise RuntimeError("the timing process for fastcpu exited with status 1")
    assert tune.target(paths, "v1", key="cpu A", measure_fn=broken, log=lines.append) == HOST
    assert lines[-1] == ("ddl: kernel tuning failed (the timing process for fastcpu exited with "
                         f"status 1); compiling for this CPU's own name, {HOST}")
    assert choose(fake) == HOST                     # remembered: not measured at every start


def test_forget_measures_again(fake):
    paths, _, measured, _ = fake
    choose(fake)
    assert tune.forget(paths, "v1", key="cpu A") == 1
    assert tune.stored(paths, "v1", key="cpu A") == (None, None)
    choose(fake)
    assert len(measured) == 2


def test_the_cpu_key_names_the_model():
    key = tune.cpu_key()
    assert tune.candidates()[0] in key and "flags:" in key
    assert tune.cpu_key() == key


def test_the_cache_folder_names_the_target():
    """Kernels compiled for different CPU names never share a cache folder."""
    assert os.path.basename(jit.cache_dir()) == f"ddl-kernels-{jit.version()}-{jit.target()}"
    assert jit.choice_files()[0].startswith(jit.cache_base())


def test_measure_times_each_candidate_in_its_own_process():
    """The real measurement, for the CPU name this session compiles for (so from the cache)."""
    measured = tune.measure([jit.target()], rounds=2)
    assert set(measured) == {jit.target()}
    assert set(measured[jit.target()]) == {"ref-cnn", "seed-cnn", "resnet-mini"}
    assert all(0 < s < 0.1 for s in measured[jit.target()].values())


def test_show_prints_the_choice_and_explicit_name(tmp_path):
    name = f"ddl-kernels-{jit.version()}.tune.json"
    measured = {"haswell": {"ref-cnn": 1 / 6000, "seed-cnn": 1 / 15000}}
    tune.write(str(tmp_path / name), jit.version(),
                {tune.cpu_key(): dict(target="haswell", measured=measured, when="then")})
    env = {k: v for k, v in os.environ.items() if k != tune.EXPLICIT}
    env["NUMBA_CACHE_DIR"] = str(tmp_path)
    shown = []
    for extra in ({}, {tune.EXPLICIT: "znver4"}):
        out = subprocess.run([sys.executable, "-m", "ddl.kernels", "--show"], cwd=ROOT,
                             env=dict(env, **extra), capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and not out.stderr, out.stderr
        shown.append(out.stdout)
    assert f"choice file: {tmp_path / name}\ntarget: haswell (chosen then)" in shown[0]
    assert "haswell: ref-cnn 6,000 images/s, seed-cnn 15,000 images/s" in shown[0]
    assert f"kernels version: {jit.version()}" in shown[0]
    assert "target: znver4 ($NUMBA_CPU_NAME; wins over the choice)" in shown[1]


# The kernels compiled for a CPU name other than this session's give the NumPy reference's results:
# the forward and both gradients of a Winograd and a direct convolution, fused with pool and ReLU.
OTHER_TARGET = """
import numpy as np
from ddl import kernels
from ddl.kernels import jit, numba as fast, numpy as reference
kernels.setup()
assert jit.target() == "{name}" and jit.cache_dir().endswith("-" + jit.code_name())
rng = np.random.default_rng(0)
for c, o, algo in ((1, 6, "single"), (2, 6, "direct"), (32, 64, "winograd")):
    x = rng.standard_normal((5, c, 10, 10)).astype(np.float32)
    w = rng.standard_normal((o, c, 3, 3)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    assert fast.algorithm(w.shape, (1, 1), (1, 1)) == algo
    y, ctx = fast.conv2d_forward(x, w, b, (1, 1), (1, 1))
    yr, ctxr = reference.conv2d_forward(x, w, b, (1, 1), (1, 1))
    g = rng.standard_normal(y.shape).astype(np.float32)
    got = fast.conv2d_backward(g, ctx, w, x.shape, (1, 1), (1, 1))
    want = reference.conv2d_backward(g, ctxr, w, x.shape, (1, 1), (1, 1))
    for a, r in zip((y, *got), (yr, *want)):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-4 * np.abs(r).max())
print("ok")
"""


def test_another_cpu_name_gives_the_reference_results():
    name = "haswell" if jit.target() != "haswell" else "znver4"
    out = subprocess.run([sys.executable, "-c", OTHER_TARGET.format(name=name)], cwd=ROOT,
                         env=dict(os.environ, NUMBA_CPU_NAME=name), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_avx2_code_on_an_avx512_cpu_gives_the_reference_results():
    """Haswell's own instruction sets (no host features: NUMBA_CPU_FEATURES empty), which is how
    the benchmark holds the kernels to AVX2: 16 vector registers of 8 floats."""
    with open("/proc/cpuinfo") as f:
        if "avx512f" not in f.read():
            pytest.skip("the host has no AVX-512: its own code is the AVX2 code")
    out = subprocess.run([sys.executable, "-c", OTHER_TARGET.format(name="haswell")], cwd=ROOT,
                         env=dict(os.environ, NUMBA_CPU_NAME="haswell", NUMBA_CPU_FEATURES=""),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_instruction_sets_given_have_their_own_cache_and_plan(monkeypatch):
    """Code for other instruction sets than the host's (an AVX2 build on an AVX-512 CPU) never
    shares a cache folder or a convolution plan with the host's."""
    monkeypatch.delenv("NUMBA_CPU_FEATURES", raising=False)
    host = jit.code_name()
    assert host == jit.target() and convplan._where()[1].split(" for ")[-1].startswith(host + ",")
    monkeypatch.setenv("NUMBA_CPU_FEATURES", "")
    avx2 = jit.code_name()
    assert avx2.startswith(jit.target() + "-features-")
    assert convplan._where()[1].split(" for ")[-1].startswith(avx2 + ",")
    monkeypatch.setenv("NUMBA_CPU_FEATURES", "+avx2,+fma")
    assert len({host, avx2, jit.code_name()}) == 3


# Two processes (the ranks of a run) asking at once: one measures, both get its choice. The
# second choice file lies in a folder not made yet (a cache base no one has used): the lock is
# beside the first, the one written.
TOGETHER = """
import os, sys, time
from ddl.kernels import tune
tune.candidates = lambda: ["hostcpu", "fastcpu"]

def measure(names):
    with open(sys.argv[2], "a") as f:
        f.write("measured\\n")
    time.sleep(1)
    return {"hostcpu": {"m": 1.0}, "fastcpu": {"m": float(sys.argv[3])}}
paths = [sys.argv[1], sys.argv[1] + ".d/choice.json"]
print(tune.target(paths, "v1", key="cpu A", measure_fn=measure, log=lambda _: None))
"""


def test_processes_starting_together_measure_once(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != tune.EXPLICIT}
    ranks = [subprocess.Popen([sys.executable, "-c", TOGETHER, str(tmp_path / "choice.json"),
                               str(tmp_path / "log"), speed], env=env, cwd=ROOT, text=True,
                              stdout=subprocess.PIPE) for speed in ("0.5", "2.0")]
    chosen = {rank.communicate(timeout=60)[0].strip() for rank in ranks}
    assert (tmp_path / "log").read_text() == "measured\n"
    assert len(chosen) == 1 and chosen <= {"hostcpu", "fastcpu"}


class Rank1:
    """Rank 1 of 2, whose rank 0 compiles for "fastcpu"."""
    rank, size = 1, 2

    def barrier(self, what, at_least=0.0):
        pass

    def bcast_obj(self, obj, root=0, what=""):
        return "fastcpu"


def test_every_rank_compiles_for_rank_0s_name_unless_its_own_is_explicit(monkeypatch):
    from ddl import kernels
    monkeypatch.delenv(tune.EXPLICIT, raising=False)
    kernels._rank_0s_target(Rank1())
    assert os.environ[tune.EXPLICIT] == "fastcpu"
    monkeypatch.setenv(tune.EXPLICIT, "haswell")
    kernels._rank_0s_target(Rank1())
    assert os.environ[tune.EXPLICIT] == "haswell"


# A stand-in for `python -m ddl.tuning`: "{}" when ready, then for each "time" the next of its
# CPU name's times (one round each), logging each turn and the thread limits it was given.
FAKE_CHILD = """#!{python}
import json, os, sys
name = os.environ["NUMBA_CPU_NAME"]
times = {times}[name]
threads = [os.environ[v] for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")]
with open({log!r} + ".pids", "a") as f:
    f.write(f"{{os.getpid()}} {{os.environ.get('DDL_TEST_INHERITED')}}\\n")
print("{{}}", flush=True)
for turn, line in enumerate(sys.stdin):
    with open({log!r}, "a") as f:
        f.write(name + " " + "".join(threads) + "\\n")
    if turn == len(times):
        sys.exit(3)
    print(json.dumps(dict(m=times[turn], n=10 * times[turn])), flush=True)
"""


def fake_children(tmp_path, monkeypatch, times):
    log = tmp_path / "turns"
    child = tmp_path / "child"
    child.write_text(FAKE_CHILD.format(python=sys.executable, times=times, log=str(log)))
    child.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(child))
    monkeypatch.setenv(tune.EXPLICIT, "inherited")
    monkeypatch.setenv("DDL_TEST_INHERITED", "yes")
    return log


def reaped(log):
    """Whether every fake timing process inherited the environment and has been waited for."""
    pids = [line.split() for line in open(f"{log}.pids")]
    for pid, inherited in pids:
        assert inherited == "yes"
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid), 0)
    return len(pids)


def test_measure_takes_turns_and_keeps_each_models_median(tmp_path, monkeypatch):
    log = fake_children(tmp_path, monkeypatch, {"a": [3, 1, 2, 9], "b": [10, 40, 30, 20]})
    own = iter([5, 7, 6, 8])

    def extra():
        with open(log, "a") as f:
            f.write("x\n")
        v = next(own)
        return dict(m=v, n=10 * v)
    measured = tune.measure(["a", "b"], rounds=4, extra={"x": extra})
    assert measured == {"a": dict(m=3, n=30), "b": dict(m=30, n=300), "x": dict(m=7, n=70)}
    assert log.read_text().split("\n") == ["a 111", "b 111", "x"] * 4 + [""]
    assert reaped(log) == 2
    log.unlink()
    assert tune.measure(["b"], rounds=3) == {"b": dict(m=30, n=300)}     # the middle of three
    assert log.read_text() == "b 111\n" * 3
    assert tune.measure(["a"], rounds=1) == {"a": dict(m=3, n=30)}


def test_a_timing_process_that_exits_is_named_with_its_status(tmp_path, monkeypatch):
    fake_children(tmp_path, monkeypatch, {"a": [1.0], "b": [1.0]})
    with pytest.raises(RuntimeError, match="the timing process for a exited with status 3"):
        tune.measure(["a", "b"], rounds=2)


def test_no_lock_where_the_lock_file_cannot_be_made(tmp_path):
    with tune.locked(str(tmp_path / "missing" / "x.lock")):
        pass
    with tune.locked(str(tmp_path / "x.lock")):
        assert (tmp_path / "x.lock").exists()


def kernels_command(tmp_path, *args, **extra):
    """`python -m ddl.kernels ARGS` on a copy of ddl whose every cache base is in tmp_path (so
    that what it forgets is the test's), its kernels as Python (nothing to compile) for
    "haswell": (exit status, output)."""
    if not (tmp_path / "pkg").exists():
        shutil.copytree(os.path.join(ROOT, "ddl"), tmp_path / "pkg" / "ddl",
                        ignore=shutil.ignore_patterns("__pycache__"))
        (tmp_path / "tmp").mkdir()
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "pkg"), NUMBA_CACHE_DIR=str(tmp_path / "c"),
               XDG_CACHE_HOME=str(tmp_path / "xdg"), TMPDIR=str(tmp_path / "tmp"),
               NUMBA_DISABLE_JIT="1", NUMBA_CPU_NAME="haswell")
    env.pop(convplan.FORCE, None)
    env.update(extra)
    out = subprocess.run([sys.executable, "-m", "ddl.kernels", *args], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    return out.returncode, out.stdout + out.stderr


def test_replan_and_retune_forget_this_cpus_choices_only(tmp_path):
    here = tmp_path / "pkg" / "ddl" / "kernels" / "__pycache__"
    kernels_command(tmp_path, "--show")
    here.mkdir()
    name, key = f"ddl-kernels-{jit.version()}", tune.cpu_key()
    tunes = [str(tmp_path / "c" / f"{name}.tune.json"), str(here / f"{name}.tune.json")]
    for path in tunes:
        tune.write(path, jit.version(), {key: dict(target="znver4"), "other": dict(target="x")})
    convs = str(tmp_path / "c" / f"{name}.convs.json")
    entry = {"(1, 2, 3)": dict(algorithm="gemm")}
    tune.write(convs, jit.version(), {f"{key} for haswell, 1 BLAS thread(s)": entry,
                                      "other for haswell, 1 BLAS thread(s)": entry})
    ready = (f"numba kernels for CPU haswell ready in 0.0 s, {jit.cores()} "
             f"process(es) (cache: {tmp_path / 'c'}/{name}-haswell)\n")
    assert kernels_command(tmp_path) == (0, ready)                     # forgets nothing
    assert kernels_command(tmp_path, "--replan") == (0, "forgot 1 stored convolution plan(s)\n")
    assert set(tune.read(convs, jit.version(), print)) == {"other for haswell, 1 BLAS thread(s)"}
    assert all(set(tune.read(p, jit.version(), print)) == {key, "other"} for p in tunes)
    assert kernels_command(tmp_path, "--retune") == (0, "forgot 0 stored convolution plan(s)\n"
                                                     + ready)
    assert all(set(tune.read(p, jit.version(), print)) == {"other"} for p in tunes)


CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 167
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: sse avx fpu

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: another core
flags\t\t: avx
"""


def test_the_cpu_key_is_the_first_processors_model_and_flags(monkeypatch):
    """The first processor's block names the model; its flags count as a set; an Arm kernel's
    "Features" stand for the flags; without /proc/cpuinfo the key is still a key."""
    import io

    def cpuinfo(text):
        def fake_open(path, *args):
            assert path == "/proc/cpuinfo"
            if text is None:
                raise FileNotFoundError(path)
            return io.StringIO(text)
        monkeypatch.setattr(tune, "open", fake_open, raising=False)
        return tune.cpu_key()
    monkeypatch.setattr(tune.llvm, "get_host_cpu_name", lambda: "somecpu")
    key = cpuinfo(CPUINFO)
    host, model, *name, flags = key.split()
    assert (host, model, " ".join(name)) == ("somecpu", "GenuineIntel/6/167",
                                            "Intel(R) Xeon(R) Processor")
    assert flags.startswith("flags:") and len(flags) == len("flags:") + 12
    assert cpuinfo(CPUINFO.replace("sse avx fpu", "fpu  sse avx")) == key
    assert cpuinfo(CPUINFO.replace("sse avx fpu", "sse avx")) != key
    assert cpuinfo(CPUINFO.replace("flags", "Features")) == key
    monkeypatch.setattr(tune.platform, "processor", lambda: "")
    monkeypatch.setattr(tune.platform, "machine", lambda: "riscv64")
    assert cpuinfo(None).startswith("somecpu ?/?/? riscv64 flags:")


def test_the_candidates_are_the_hosts_name_then_the_others(monkeypatch):
    monkeypatch.setattr(tune.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(tune.llvm, "get_host_cpu_name", lambda: "sapphirerapids")
    assert tune.candidates() == ["sapphirerapids", "haswell", "znver4"]
    monkeypatch.setattr(tune.llvm, "get_host_cpu_name", lambda: "znver4")
    assert tune.candidates() == ["znver4", "haswell"]
    monkeypatch.setattr(tune.platform, "machine", lambda: "AMD64")
    assert tune.candidates() == ["znver4", "haswell"]
    monkeypatch.setattr(tune.platform, "machine", lambda: "aarch64")
    assert tune.candidates() == ["znver4"]


def test_another_name_beating_the_host_by_exactly_the_margin_wins(monkeypatch):
    monkeypatch.setattr(tune, "candidates", lambda: [HOST, "fastcpu"])
    times = {HOST: {"m": 0.5 * (1 + tune.MARGIN)}, "fastcpu": {"m": 0.5}}
    assert tune.decide(lambda _: times, print)["target"] == "fastcpu"


def test_stored_says_a_damaged_file_only_where_asked(tmp_path):
    damaged = tmp_path / "a.json"
    damaged.write_text("{not json")
    lines = []
    assert tune.stored([str(damaged)], "v1", key="cpu A", log=lines.append) == (None, None)
    assert len(lines) == 1
    assert lines[0].startswith(f"ddl: ignoring the kernel tuning file {damaged} (")
    assert tune.stored([str(damaged)], "v1", key="cpu A") == (None, None)


def test_the_margin_is_on_the_geometric_mean_over_the_models(fake, monkeypatch):
    """2% faster over both models (0.8 x 1.2 = 0.96: a geometric mean of 0.98) is noise; the
    same candidate 20% faster on one model and as fast on the other wins."""
    monkeypatch.setattr(tune, "candidates", lambda: [HOST, "fastcpu"])
    host = {"m": 1.0, "n": 1.0}

    def decide(fast):
        return tune.decide(lambda _: {HOST: host, "fastcpu": fast}, print)["target"]
    assert decide({"m": 0.8, "n": 1.2}) == HOST
    assert decide({"m": 0.8, "n": 1.0}) == "fastcpu"


def test_measure_takes_seven_rounds_unless_told(tmp_path, monkeypatch):
    log = fake_children(tmp_path, monkeypatch, {"a": [1, 2, 3, 4, 5, 6, 7, 8]})
    assert tune.measure(["a"]) == {"a": dict(m=4, n=40)}
    assert log.read_text() == "a 111\n" * 7


def test_show_says_what_is_not_stored_and_lists_the_convolutions(tmp_path):
    def show(**env):
        code, out = kernels_command(tmp_path, "--show", **env)
        assert code == 0, out
        return out.splitlines()[2:]     # after the CPU and the version
    assert show() == ["target: haswell ($NUMBA_CPU_NAME; wins over the choice)",
                      "no tuning choice stored yet: the next compile measures it",
                      "convolution algorithms: 0 layer shape(s) timed (ddl train times its "
                      "model's at start-up)"]
    name, key = f"ddl-kernels-{jit.version()}", tune.cpu_key()
    tune.write(str(tmp_path / "c" / f"{name}.tune.json"), jit.version(),
               {key: dict(target="znver4", error="boom", when="then")})
    convs = str(tmp_path / "c" / f"{name}.convs.json")
    timed = {"b": dict(algorithm="gemm", ms=dict(gemm=1.234, direct=2.5)),
             "a": dict(algorithm="direct")}
    tune.write(convs, jit.version(), {f"{key} for znver4, 1 BLAS thread(s)": timed})
    assert show(NUMBA_CPU_NAME="", DDL_CONV_ALGORITHM="direct") == [
        f"choice file: {tmp_path / 'c' / name}.tune.json",
        "target: znver4 (chosen then); the measurement failed: boom",
        f"convolution algorithms: 2 layer shape(s) timed for {key} for znver4, 1 BLAS "
        f"thread(s) in {convs}",
        "  a: direct (the only one that fits)", "  b: gemm (ms: direct 2.50, gemm 1.23)",
        "forced: direct wherever it fits ($DDL_CONV_ALGORITHM)"]
    assert show()[-1] == ("convolution algorithms: 0 layer shape(s) timed (ddl train times its "
                          "model's at start-up)")       # none timed for haswell


def test_help_shows_what_the_command_does(tmp_path):
    code, out = kernels_command(tmp_path, "--help")
    assert code == 0 and ("`python -m ddl.kernels [--show | --retune | --replan]`: compile every "
                          "kernel into numba's cache") in " ".join(out.split()), out

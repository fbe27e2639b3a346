"""Mutation testing of the numeric core with cosmic-ray (`make mutate`; docs/mutation.md).

Each module is mutated on its own, in a copy of the tracked files (a stopped run never leaves a
mutated file in the working tree), with the tests that guard it: a mutant is killed when they
fail, survives when they pass, and counts as killed when it outruns the timeout (a loop that
never ends). The kernel files' mutants run their kernels as Python (PYTHON below); a compiled
kernel is compiled afresh for each mutant: ddl's kernel cache is named after a hash of
ddl/kernels/*.py, and NUMBA_CACHE_DIR points into the copy, so no cache outside it is touched.
Usage: scripts/mutate.py [MODULE ...] (default: every module below); the survivors
are printed as diffs, the score per module as a table.
"""
import argparse
import json
import os
import shlex
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time

import llvmlite.binding as llvm

# Module -> the tests that guard it (-x: the first failure kills the mutant). The kernel files'
# selections leave out what runs minutes as Python (PYTHON below): the largest finite-difference
# cases, the named models, and the tests of numba's cache and `warm`, which need compiled kernels.
_AS_PYTHON = ("not 3-5-1 and not 3-3-1 and not direct-cfg4 and not direct-cfg5 and not "
              "winograd-cfg6 and not winograd-cfg7 and not winograd-cfg8 and not winograd-cfg9 "
              "and not named_models and not warm and not compiles_first and not read_only")
_COMPILED = ("tests/test_references.py tests/test_layers.py tests/test_mutants.py "
             "tests/test_kernels.py -k '(numba or test_kernels) and " + _AS_PYTHON + "'")
# The convolution kernels' selection: tests/test_conv_paths.py reaches every line of direct.py and
# winograd.py on small shapes (a few seconds as Python), first, so that most mutants die in it.
# Left out: a direct layer of 32 channels (4 s as Python) and a test of the Python mode itself.
_CONVS = ("tests/test_conv_paths.py tests/test_references.py tests/test_mutants.py "
          "-k '(conv_paths or numba) and not 32-40 and not disable_jit'")
TESTS = {
    "ddl/kernels/numpy.py": "tests/test_references.py tests/test_layers.py tests/test_optim.py "
                            "tests/test_loss.py tests/test_mutants.py -k numpy",
    "ddl/kernels/direct.py": _CONVS,
    "ddl/kernels/winograd.py": _CONVS,
    "ddl/kernels/single.py": "tests/test_kernels.py tests/test_references.py "
                             "-k '(single and not single-cfg2) or pooled_first_layer'",
    "ddl/kernels/strided.py": "tests/test_kernels.py -k '(strided or fold_writes) and not "
                              "differences[strided-cfg18] and not differences[strided-cfg23]'",
    "ddl/kernels/convplan.py": "tests/test_convplan.py -k 'not every_rank_runs'",
    "ddl/kernels/pool.py": _COMPILED,
    "ddl/kernels/gemm.py": _COMPILED,
    "ddl/kernels/norm.py": _COMPILED,
    "ddl/kernels/arrays.py": _COMPILED,
    "ddl/kernels/numba.py": _COMPILED,
    "ddl/kernels/loss.py": "tests/test_kernels.py tests/test_loss.py tests/test_mutants.py "
                           "-k 'cross_entropy and not numpy'",
    "ddl/kernels/optim.py": "tests/test_kernels.py tests/test_optim.py tests/test_mutants.py "
                            "-k 'optimizer or (numba and (test_optim or rmsprop or adam))'",
    "ddl/kernels/bf16.py": "tests/test_exchange.py -k 'bf16 and not exchange_is'",
    # The tuning, the backend switch and `python -m ddl.kernels`: their own logic, with fakes
    # for the measurement and the ranks; the real measurement compiles in child processes.
    "ddl/kernels/tune.py": "tests/test_tune.py tests/test_convplan.py -k 'not measure_times and "
                           "not another_cpu_name and not every_rank_runs'",
    "ddl/kernels/__init__.py": "tests/test_kernels.py tests/test_convplan.py tests/test_tune.py "
                               "-k 'backends_offer or kernels_choice or importing or choose or "
                               "numpy_kernels_plan or forced or other_ranks or rank_0s_name or "
                               "warm_order'",
    "ddl/kernels/__main__.py": "tests/test_tune.py -k 'show or replan'",
    # Compiled (not in PYTHON): as Python, `kernel` hands back the plain function and nothing is
    # registered, cached or warmed, i.e. most of jit.py never runs. Its selection calls no
    # kernel of ddl's but pool.relu (a mutant's new version would compile each again).
    "ddl/kernels/jit.py": "tests/test_jit.py tests/test_tune.py tests/test_trust.py "
                          "tests/test_kernels.py -k 'test_jit or cache_folder or damaged_cache "
                          "or numba_still or importing or read_only'",
    "ddl/nn/summary.py": "tests/test_own_data.py tests/test_models.py -k 'summary or fixed_size'",
    "ddl/nn/layers.py": "tests/test_references.py tests/test_layers.py tests/test_mutants.py",
    "ddl/nn/module.py": "tests/test_mutants.py tests/test_layers.py tests/test_optim.py",
    "ddl/nn/loss.py": "tests/test_loss.py tests/test_mutants.py",
    "ddl/optim.py": "tests/test_optim.py tests/test_mutants.py",
    "ddl/parallel.py": "tests/test_mutants.py tests/test_optim.py",
}
# The modules whose mutants run their kernels as Python (NUMBA_DISABLE_JIT=1): any edit in
# ddl/kernels/ changes the version that names the kernels' cache, so compiled, every mutant there
# would compile every kernel its tests call again (minutes each on two loaded cores). As Python
# a mutant does what it does compiled, with the caveats in docs/mutation.md. But jit.py, whose
# decorator, cache and `warm` do nothing as Python: its selection runs no kernel of ddl's but one.
PYTHON = ({m for m in TESTS if m.startswith("ddl/kernels/")}
          - {"ddl/kernels/numpy.py", "ddl/kernels/jit.py"})
# The operators that make one natural mistake each (+ for -, < for <=, a constant off by one, a
# loop that never runs, a negated condition). Excluded: the rest of cosmic-ray's binary operator
# table (a + b -> a << b and the like, 11 per operator: mostly crashes, and most of the count),
# comparisons replaced by `is`, RemoveDecorator (an undecorated kernel is the same function,
# uncompiled) and the Variable* operators (random names).
KEEP = [
    "ReplaceBinaryOperator_(Add_Sub|Sub_Add|Mul_Div|Div_Mul|FloorDiv_Mul|Mod_FloorDiv|Pow_Mul)$",
    "ReplaceComparisonOperator_(Lt_LtE|LtE_Lt|Gt_GtE|GtE_Gt|Eq_NotEq|NotEq_Eq|Is_IsNot|IsNot_Is)$",
    "ReplaceUnaryOperator_USub_UAdd$",
    "(AddNot|ReplaceTrueWithFalse|ReplaceFalseWithTrue|ReplaceAndWithOr|ReplaceOrWithAnd)$",
    "(ReplaceBreakWithContinue|ReplaceContinueWithBreak|NumberReplacer|ZeroIterationForLoop)$",
]
TIMEOUT = 120.0   # seconds per mutant at least (a baseline with every kernel compiled: about 40)


def operators(python):
    import re
    names = subprocess.run([python, "-m", "cosmic_ray.cli", "operators"], capture_output=True,
                           text=True, check=True).stdout.split()
    return [n for n in names if not any(re.search(k, n) for k in KEEP)]


def tests(module, python):
    """The test command, as words (for the baseline) and as a shell line (for cosmic-ray)."""
    env = "NUMBA_DISABLE_JIT=1 " if module in PYTHON else ""
    line = f"{env}{python} -m pytest -x -q -p no:cacheprovider {TESTS[module]}"
    return ["sh", "-c", line], "sh -c " + shlex.quote(line)   # cosmic-ray shlex-splits it


def config(module, python, excluded, timeout):
    return "\n".join([
        "[cosmic-ray]",
        f'module-path = "{module}"',
        f"timeout = {timeout:.0f}",
        "excluded-modules = []",
        "test-command = " + json.dumps(tests(module, python)[1]),
        "[cosmic-ray.distributor]",
        'name = "local"',
        "[cosmic-ray.filters.operators-filter]",
        "exclude-operators = " + json.dumps([n + "$" for n in excluded]),
        "",
    ])


def sample(db, size, seed):
    """Mark all but `size` of the mutants still to run (a seeded random choice) as skipped.
    The choice is made from the mutants in the order of their place and operator: their job ids
    are random, new at each `cosmic-ray init`, so a seed alone would not choose the same ones."""
    import random
    con = sqlite3.connect(db)
    pending = [j for (j,) in con.execute(
        "SELECT job_id FROM mutation_specs WHERE job_id NOT IN (SELECT job_id FROM work_results) "
        "ORDER BY start_pos_row, start_pos_col, operator_name, occurrence")]
    chosen = set(random.Random(seed).sample(pending, min(size, len(pending))))
    con.executemany("INSERT INTO work_results (worker_outcome, job_id) VALUES ('SKIPPED', ?)",
                    [(j,) for j in pending if j not in chosen])
    con.commit()


def run(module, copy, python, excluded, out, size, seed):
    name = module.replace("/", "_").removesuffix(".py")
    cfg, db = os.path.join(out, name + ".toml"), os.path.join(out, name + ".sqlite")
    if os.path.exists(db):
        os.remove(db)
    bindir = os.path.dirname(python)
    # Unmutated, the tests must pass (or every mutant would count as killed); this run also fills
    # numba's cache with the unmutated kernels. A mutant may take 4 times as long before its
    # run counts as a loop that never ends (kernels as Python are slow, and the machine loaded).
    baseline = tests(module, python)[0]
    started = time.monotonic()
    if subprocess.run(baseline, cwd=copy, stdout=subprocess.DEVNULL).returncode:
        sys.exit(f"mutate: the tests of {module} fail without a mutant: {baseline[-1]}")
    with open(cfg, "w") as f:
        f.write(config(module, python, excluded,
                       max(TIMEOUT, 4 * (time.monotonic() - started))))
    subprocess.run([python, "-m", "cosmic_ray.cli", "init", cfg, db], cwd=copy, check=True)
    subprocess.run([os.path.join(bindir, "cr-filter-operators"), db, cfg], cwd=copy, check=True)
    if size:
        sample(db, size, seed)
    subprocess.run([python, "-m", "cosmic_ray.cli", "exec", cfg, db], cwd=copy, check=True)
    return db


def summary(db):
    """(total, killed, survivors as [(job_id, operator, line, diff)])."""
    con = sqlite3.connect(db)
    rows = con.execute(
        "SELECT m.job_id, m.operator_name, m.start_pos_row, r.test_outcome, r.diff "
        "FROM mutation_specs m JOIN work_results r ON m.job_id = r.job_id "
        "WHERE r.worker_outcome IN ('NORMAL', 'EXCEPTION')").fetchall()
    survivors = [(j, op, line, diff) for j, op, line, outcome, diff in rows
                 if outcome == "SURVIVED"]
    return len(rows), len(rows) - len(survivors), survivors


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", default=list(TESTS), metavar="MODULE")
    parser.add_argument("--out", default="mutants", help="folder for configs and sessions")
    parser.add_argument("--sample", type=int, default=0, metavar="N",
                        help="test N mutants per module, chosen at random (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="of the --sample choice")
    args = parser.parse_args()
    unknown = [m for m in args.modules if m not in TESTS]
    if unknown:
        sys.exit(f"mutate: no tests chosen for {', '.join(unknown)} (known: {', '.join(TESTS)})")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    python = sys.executable
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    excluded = operators(python)
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                             cwd=root, capture_output=True, text=True,
                             check=True).stdout.split()
    rows = []
    with tempfile.TemporaryDirectory(prefix="ddl-mutate-") as copy:
        for path in tracked:
            if os.path.isfile(os.path.join(root, path)):
                os.makedirs(os.path.join(copy, os.path.dirname(path)), exist_ok=True)
                shutil.copy2(os.path.join(root, path), os.path.join(copy, path))
        os.environ["NUMBA_CACHE_DIR"] = os.path.join(copy, ".numba-cache")
        os.environ["PYTHONPATH"] = copy   # the copy's ddl, not the editable install's
        # A mutant in ddl/kernels/ changes the version that the CPU tuning is stored for, and
        # measuring it again takes minutes per mutant: the CPU name changes the machine code's
        # speed, never what it computes.
        os.environ.setdefault("NUMBA_CPU_NAME", llvm.get_host_cpu_name())
        for module in args.modules:
            started = time.monotonic()
            total, killed, survivors = summary(run(module, copy, python, excluded, out,
                                                  args.sample, args.seed))
            rows.append((module, total, killed, time.monotonic() - started))
            for job, op, line, diff in survivors:
                print(f"SURVIVED {module}:{line} {op} ({job})\n{diff}", flush=True)
    print("| module | mutants run | killed | score | minutes |\n| --- | --- | --- | --- | --- |")
    for module, total, killed, took in rows:
        print(f"| {module} | {total} | {killed} | {100 * killed / max(total, 1):.1f}% "
              f"| {took / 60:.1f} |")


if __name__ == "__main__":
    main()

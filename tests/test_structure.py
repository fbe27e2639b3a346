"""The shape of the code that the next backends land on: no import cycle (scripts/import_cycles.py,
which `make lint` runs, shown to find one hidden in a function), and a training loop that stays
readable on two screens."""
import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

CHECK = ROOT / "scripts" / "import_cycles.py"


def cycles_in(package):
    done = subprocess.run([sys.executable, CHECK, package], capture_output=True, text=True)
    return done.returncode, done.stdout


def test_ddl_has_no_import_cycle():
    code, out = cycles_in(ROOT / "ddl")
    assert code == 0 and out.strip().endswith("0 import cycle(s)"), out


def test_a_cycle_hidden_in_a_function_or_a_package_init_is_found(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg import b\n")
    (pkg / "b.py").write_text("import pkg.sub.c\n")
    (pkg / "sub" / "__init__.py").write_text("from pkg.a import f\n")
    (pkg / "sub" / "c.py").write_text("")
    code, out = cycles_in(pkg)
    assert code == 1 and "import cycle: pkg.a <-> pkg.b <-> pkg.sub" in out, out
    (pkg / "a.py").write_text("def f():\n    pass\n")
    assert cycles_in(pkg) == (0, "5 modules, 0 import cycle(s)\n")


def test_the_training_loop_reads_on_two_screens():
    source = Path(ROOT / "ddl" / "train.py").read_text()
    assert len(source.splitlines()) <= 250
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= 80, f"train.{node.name} is {length} lines"

# Every target works from a fresh clone with Python 3.11 and no system MPI:
# the mpich wheel from PyPI brings mpiexec into .venv/bin.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
RAW    ?= $(firstword $(wildcard ../shared/data/mnist) data/raw)
DATA   := data/mnist.h5
NP     ?= 4

.PHONY: install install-torch test lint data train bench mutate clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,plot]'
	$(BIN)/python -m ddl.kernels
	touch $@

# PyTorch's CPU build, the anchor of the parity tests (tests/test_torch_parity.py, which skip
# without it) and of make bench; CI installs it.
install-torch: $(VENV)/.torch

$(VENV)/.torch: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[test,plot,bench]'
	touch $@

# One pytest worker per core (at most 4): a test mostly waits on the ranks it started. Each file
# runs whole in one worker, so a module's fixture is made once: an emulated cluster (test_multinode,
# test_elastic: each its own node names) or a reference run. (--dist loadgroup would balance finer,
# but pytest 9 ignores the group xdist 3.8 writes into the test's id.)
test: install
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist loadfile --durations=15

lint: install
	$(BIN)/ruff check .
	$(BIN)/python scripts/import_cycles.py

data: $(DATA)

$(DATA): | install
	$(BIN)/python scripts/prepare_mnist.py --raw $(RAW) --out $@ $(if $(findstring shared,$(RAW)),,--download)

# The demo recipe: each `make train` is a new run, replacing the last one's files in data/.
train: install data
	$(BIN)/ddl launch -n $(NP) -- train --data $(DATA) --checkpoint data/checkpoint.h5 \
	    --metrics data/metrics.jsonl --plot data/curves.png --overwrite
	$(BIN)/ddl predict --data $(DATA) --checkpoint data/checkpoint.h5 --index 0 --out data/prediction.png

bench: install-torch
	$(BIN)/python scripts/benchmark.py --out docs/benchmarks.md

# Mutation testing of ddl/nn, ddl/kernels, ddl/optim.py and ddl/parallel.py, each module against
# the tests chosen for it in scripts/mutate.py (docs/mutation.md); MODULES= picks some, SAMPLE=N
# tests N random mutants of each (a full run takes hours on 2 cores). Not in CI.
mutate: $(VENV)/.mutate
	$(BIN)/python scripts/mutate.py $(if $(SAMPLE),--sample $(SAMPLE)) $(MODULES)

$(VENV)/.mutate: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[test,plot,mutate]'
	touch $@

clean:
	rm -rf $(VENV) *.egg-info mutants data/*.h5 data/*.png data/*.jsonl

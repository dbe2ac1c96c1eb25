# Every target sets up its own virtual environment first, so a fresh clone
# needs nothing but python3 (and, for the qemu backend, qemu-utils).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test lint check bless bench

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# The cases run on every backend here too, so CI gates on engine, cli and
# real QEMU alike (qemu items are skipped, with the reason, where it is absent).
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -n auto -q --backend all

lint: $(STAMP)
	$(PY) -m ruff check .

# Every case on every available backend, ending with a case/backend/result/time
# table; non-zero on any failure. Extra pytest arguments: make check ARGS="-k 154".
check: $(STAMP)
	$(PY) -m harness check $(ARGS)

# Rewrite golden/*.out by running the cases on real QEMU (all, or CASES="...").
bless: $(STAMP)
	$(PY) -m harness bless $(CASES)

# Speed and memory as ratios against QEMU measured in the same run (needs
# qemu-utils, QEMU's source for the 154 comparison, and ~3 GiB of free disk).
bench: $(STAMP)
	$(PY) bench/run.py $(ARGS)

# Differential fuzzing: random cases on the engine and on real QEMU, each
# disagreement shrunk and written to fuzz-findings/ as a case and its golden
# (a random seed unless given; it is printed). E.g. make fuzz ARGS="--seed 7".
.PHONY: fuzz
fuzz: $(STAMP)
	$(PY) -m harness fuzz --count 2000 --time-budget 1800 $(ARGS)

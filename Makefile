# Every target sets up its own virtual environment first, so a fresh clone
# needs nothing but python3 (and, for the qemu backend, qemu-utils).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test lint

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -n auto -q

lint: $(STAMP)
	$(PY) -m ruff check .

# Every target sets itself up: a fresh machine needs only python3 (>= 3.11) and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned torch pulls gigabytes of CUDA packages.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/perceive demo --out demo_out

test: setup
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check perceive tests benchmarks
	$(BIN)/ruff format --check perceive tests benchmarks
	$(BIN)/mypy

bench: setup
	$(BIN)/python benchmarks/world_speed.py

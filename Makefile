# Every target sets itself up: a fresh machine needs only python3 (>= 3.11) and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup browser demo test lint bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned torch pulls gigabytes of CUDA packages.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/perceive demo --out demo_out

# Debian's chromium for the web page test (Playwright drives it; no browser is downloaded).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  (apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1)) || \
	  echo "note: could not install chromium; the browser test will be skipped"

test: setup browser
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check perceive tests benchmarks
	$(BIN)/ruff format --check perceive tests benchmarks
	$(BIN)/mypy

bench: setup
	$(BIN)/python benchmarks/world_speed.py

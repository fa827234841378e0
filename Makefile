# The two commands of the README: `make demo` (main job end to end) and `make test`.
VENV ?= .venv
export SINKGUARD_VENV := $(VENV)

.PHONY: setup demo test test-fast lint bench

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/sinkguard demo --out runs/demo

test: setup lint
	$(VENV)/bin/python -m pytest

lint: setup
	$(VENV)/bin/ruff check sinkguard benchmarks tests

test-fast: setup
	$(VENV)/bin/python -m pytest -m "not slow"

bench: setup
	$(VENV)/bin/python benchmarks/bench_scan.py --lengths 256 1024 4096 --runs 3 --extra-lengths 8192

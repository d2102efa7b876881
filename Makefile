# `make run` and `make test` set up everything they need on a fresh machine with Python 3.11+:
# uv (if missing), then the locked environment from uv.lock.
SHELL := /bin/bash
PYTHON ?= python3
UV := $(shell command -v uv 2>/dev/null || echo "$(PYTHON) -m uv")

# No telemetry from Prefect, DVC or Great Expectations.
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export GX_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1

.PHONY: setup run test lint bench

setup:
	@command -v uv >/dev/null 2>&1 || $(PYTHON) -m uv --version >/dev/null 2>&1 \
		|| $(PYTHON) -m pip install --quiet uv
	$(UV) sync --frozen

run: setup
	$(UV) run synthloop run

test: setup
	$(UV) run pytest

lint: setup
	$(UV) run ruff check .
	$(UV) run ruff format --check .

bench: setup
	$(UV) run python benchmarks/ingest_clean.py

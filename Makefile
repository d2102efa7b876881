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

.PHONY: setup browser run test lint bench serve

# Bytecode is compiled once at install: where PYTHONDONTWRITEBYTECODE is set, every stage
# process would otherwise recompile torch's and GX's sources on import (twice the start-up).
setup:
	@command -v uv >/dev/null 2>&1 || $(PYTHON) -m uv --version >/dev/null 2>&1 \
		|| $(PYTHON) -m pip install --quiet uv
	$(UV) sync --frozen --compile-bytecode

# Debian's chromium for the Prefect UI test; where it cannot be installed (no apt, no root),
# that one test is skipped and says why.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo "sudo -n")
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		export DEBIAN_FRONTEND=noninteractive; \
		$(SUDO) apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
		|| { $(SUDO) apt-get update -qq >/dev/null 2>&1 \
		     && $(SUDO) apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; } \
		|| echo "chromium could not be installed: the browser test will be skipped"; }

run: setup
	$(UV) run synthloop run

serve: setup
	$(UV) run synthloop serve

# One pytest worker per CPU, idle ones stealing queued tests; most tests wait on subprocesses
# (DVC, Prefect, stage processes) as much as they compute.
test: setup browser
	$(UV) run pytest -n auto --dist worksteal

lint: setup
	$(UV) run ruff check .
	$(UV) run ruff format --check .

bench: setup
	$(UV) run python benchmarks/ingest_clean.py

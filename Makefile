# The two commands: `make demo` serves the demo, `make test` runs every check.
# `make demo LISTEN=127.0.0.1:8081` serves it elsewhere; `GPUS=2` on two cards.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LISTEN ?= 127.0.0.1:8080
GPUS ?= 1

.PHONY: demo demo-cluster test lint bench clean

# What serving needs, and nothing more: the demo needs only Python.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

# The test extra on top (pytest, playwright, mypy, ruff, llama-cpp-python), for
# test, lint and bench. llama-cpp-python compiles llama.cpp for the CPU on every
# core; pip caches the wheel it built, so a later install is quick.
$(BIN)/.installed-test: $(BIN)/.installed
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/switchd demo --listen $(LISTEN) --gpus $(GPUS)

# Three simulated hosts, their agents on a one-node Ray cluster (loopback, one CPU),
# and the gateway with the UI at $(LISTEN): `switchd gateway` on one machine.
$(BIN)/.installed-cluster: $(BIN)/.installed
	$(BIN)/pip install --quiet -e '.[cluster]'
	touch $@

demo-cluster: $(BIN)/.installed-cluster
	$(BIN)/python -m switchd.cluster.demo --listen $(LISTEN)

lint: $(BIN)/.installed-test
	$(BIN)/ruff check switchd tests bench
	$(BIN)/ruff format --check switchd tests bench
	$(BIN)/mypy --strict switchd tests bench

test: lint
	$(BIN)/python -m pytest -q

# Every benchmark, each bounded, loopback only; writes docs/benchmarks.md.
# `make bench QUICK=1` runs each with --quick. nginx is compared where installed.
bench: $(BIN)/.installed-test
	$(BIN)/python -m bench.report $(if $(QUICK),--quick)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

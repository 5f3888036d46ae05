# The two commands: `make demo` serves the demo, `make test` runs every check.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LISTEN ?= 127.0.0.1:8080
GPUS ?= 1

.PHONY: demo test lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/switchd demo --listen $(LISTEN) --gpus $(GPUS)

lint: $(BIN)/.installed
	$(BIN)/ruff check switchd tests bench
	$(BIN)/ruff format --check switchd tests bench
	$(BIN)/mypy --strict switchd tests bench

test: lint
	$(BIN)/python -m pytest -q

bench: $(BIN)/.installed
	$(BIN)/python -m bench.status
	$(BIN)/python -m bench.proxy
	$(BIN)/python -m bench.contention

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

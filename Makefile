# Two commands on a fresh machine: `make run` and `make test`. Both set up
# everything first (idempotently): the venv with the package and dev tools, and
# as root the system parts BPF needs (scripts/setup-system.sh).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
ARGS ?=

.PHONY: setup system run test lint typecheck unit bench clean

setup: $(STAMP) system

$(STAMP): pyproject.toml tests/fixtures/testplugin/pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]' -e tests/fixtures/testplugin
	@touch $(STAMP)

system: $(STAMP)
	@bash scripts/setup-system.sh $(VENV)

run: setup
	$(BIN)/bpfpipe run $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

test: setup lint typecheck
	$(BIN)/pytest

unit: $(STAMP)
	$(BIN)/pytest tests/unit tests/property

bench: setup
	$(BIN)/python bench/throughput.py
	$(BIN)/python bench/ringbuf.py
	$(BIN)/python bench/overload.py
	$(BIN)/python bench/efficiency.py
	$(BIN)/python bench/batch_cost.py
	$(BIN)/python bench/metrics.py
	$(BIN)/python bench/jetstream.py
	$(BIN)/python bench/fleet.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis

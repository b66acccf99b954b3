# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

## Start ScaiLink on its embedded defaults (SQLite file, dev keys) and print a dev admin token.
run: $(STAMP)
	$(BIN)/scailink dev

## Run the whole test suite (lint, types, tests; PostgreSQL too when it is reachable).
test: $(STAMP)
	$(BIN)/ruff check src tests bench conformance
	$(BIN)/ruff format --check src tests bench conformance
	$(BIN)/mypy
	$(BIN)/python -m pytest

# authz-server — `make help` lists the targets.
.DEFAULT_GOAL := help
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help install lint format test run bench clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install the package (editable) with dev extras

lint: $(STAMP) ## ruff (lint + format check) and mypy
	$(BIN)/ruff check authz_server tests examples bench
	$(BIN)/ruff format --check authz_server tests examples bench
	$(BIN)/mypy

format: $(STAMP) ## Apply ruff formatting and safe fixes
	$(BIN)/ruff check --fix authz_server tests examples bench
	$(BIN)/ruff format authz_server tests examples bench

test: $(STAMP) ## Run the whole test suite (unit + end-to-end through a real Envoy)
	$(BIN)/pytest

run: $(STAMP) ## Demo: Envoy in front of the server with examples/demo, prints curl commands
	$(BIN)/python examples/demo/run.py

bench: $(STAMP) ## Per-Check CPU cost with a local loop (no network)
	$(BIN)/python bench/check_loop.py

clean: ## Remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

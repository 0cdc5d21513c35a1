# One-command set-up: every target creates .venv when missing, installs the pinned
# CPU build of torch first, then the package with the extras it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
LINT := src tests $(wildcard benchmarks)

.PHONY: demo test lint format venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet $(TORCH_PIN)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/flowdistill demo

test: $(VENV)/.installed
	$(BIN)/ruff check $(LINT)
	$(BIN)/ruff format --check $(LINT)
	$(BIN)/python -m pytest -q

format: $(VENV)/.installed
	$(BIN)/ruff check --fix $(LINT)
	$(BIN)/ruff format $(LINT)

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info

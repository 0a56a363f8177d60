# Two entry points: `make demo` (the main job) and `make test` (the test suite). Both create and use
# .venv in this checkout and install what they need into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch 2.13.0 on a machine without a GPU; GPU users may set TORCH=torch (or pin
# a CUDA build) and TORCH_INDEX to their wheel index.
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
PIP := $(PY) -m pip install --progress-bar off

.PHONY: setup demo test lint format clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(PIP) -e ".[dev,lensing,fits]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m toolkit.demo

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest

format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

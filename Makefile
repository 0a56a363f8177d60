# Entry points: `make demo` (the main job), `make demo-study` (its label-efficiency study, a
# command of its own so that each stays under 30 minutes on a 2-core CPU), `make demo-tune`
# (where its classifiers' learning rates come from), `make test` (the test suite, the gate) and
# `make test-fast` (its quick part, for the inner loop). Each creates and uses .venv in this checkout and installs what it needs into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch 2.13.0 on a machine without a GPU; GPU users may set TORCH=torch (or pin
# a CUDA build) and TORCH_INDEX to their wheel index.
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
# --no-compile: no bytecode for every file of every package at install (torch alone: 22 s -> 7 s
# here); Python compiles what is imported, once, on first use.
PIP := $(PY) -m pip install --progress-bar off --no-compile

.PHONY: setup demo demo-study demo-tune test test-fast test-numeric lint format clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(PIP) -e ".[dev,lensing,fits,s3]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m toolkit.demo

demo-study: setup
	$(PY) -m toolkit.demo --study

demo-tune: setup
	$(PY) -m toolkit.demo --tune

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest
	$(MAKE) --no-print-directory test-numeric

# The inner loop: lint, the unit tests and the end-to-end tests that take seconds (every
# registered part's basics among them); not the slow, 2-process, Slurm or numeric ones, which
# `make test` (the gate CI runs) adds.
test-fast: lint
	$(PY) -m pytest -m "not slow and not cluster and not numeric" tests/unit tests/e2e tests/storage

# The tests marked `numeric` compare floats from two kernel sets (compiled and eager, numbers
# recorded on another CPU): rerun them with the kernels of a CPU with AVX2 only and of one with no
# SIMD at all, whatever this one has. Each pass has an inductor cache of its own: the cache's key
# leaves out the vector instruction set, and a kernel generated for another one computes garbage
# (NaN losses) or does not compile.
numeric_pass = ATEN_CPU_CAPABILITY=$(1) ONEDNN_MAX_CPU_ISA=$(2) \
	TORCHINDUCTOR_CACHE_DIR=$(CURDIR)/.pytest_cache/inductor-$(1) $(PY) -m pytest -m numeric

test-numeric: setup
	@if grep -qw avx2 /proc/cpuinfo 2>/dev/null; then \
		echo "numeric tests with AVX2 kernels"; $(call numeric_pass,avx2,AVX2); \
	else echo "numeric tests with AVX2 kernels: skipped, this CPU has no AVX2"; fi
	$(call numeric_pass,default,SSE41)

format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

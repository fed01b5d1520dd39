# Two commands on a fresh machine:
#   make compare   -- the main job: jaxattn compare on its built-in defaults
#   make test      -- the CPU test suite (Pallas kernels in interpret mode)
# Both create the local virtual environment .venv on first use.

PYTHON ?= $(shell command -v python3.12 || echo python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: compare test test-gpu bench venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

compare: $(STAMP)
	$(BIN)/jaxattn compare

test: $(STAMP)
	$(BIN)/python -m pytest tests

test-gpu: $(STAMP)
	JAX_PLATFORMS=cuda $(BIN)/python -m pytest tests -m gpu

bench: $(STAMP)
	$(BIN)/jaxattn bench

clean:
	rm -rf $(VENV) .pytest_cache

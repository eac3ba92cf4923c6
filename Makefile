# make demo: train + evaluate the Copy-task demo (no data needed); make test: the test suite;
# make lint: ruff, and the import layering of pyproject.toml (lint-imports).
# Both create .venv and install sbtrain with the CPU build of torch 2.13.0 when .venv is missing,
# plus triton where a wheel exists for the platform (its interpreter runs the fused kernels'
# tests on the CPU; without it those tests are skipped, and the summary says so).
# With a GPU, keep your own torch (and its triton): install them into .venv, then make TORCH= test
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TRITON ?= triton==3.6.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(if $(TORCH),$(BIN)/python -m pip install -q $(TORCH))
	$(BIN)/python -m pip install -q -e '.[test,hf]'
	$(BIN)/python -m pip install -q -e '.[eval]' \
	  || echo "the eval extra (lm-eval) did not install: the lm-evaluation-harness test will be skipped"
	$(if $(TRITON),$(BIN)/python -m pip install -q --only-binary=:all: '$(TRITON)' \
	  || echo "no $(TRITON) wheel for this platform: the fused kernels' tests will be skipped")
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sbtrain train recipes/copy-demo.yaml
	$(BIN)/sbtrain eval-ppl checkpoints/copy-demo/checkpoint_best.pt

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/lint-imports --no-cache

clean:
	rm -rf $(VENV) checkpoints .pytest_cache

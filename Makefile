# make demo: train + evaluate the Copy-task demo (no data needed); make test: the test suite.
# Both create .venv and install sbtrain with the CPU build of torch 2.13.0 when .venv is missing,
# plus triton, whose interpreter runs the fused kernels' tests on the CPU.
# With a GPU, keep your own torch (and its triton): install them into .venv, then make TORCH= test
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0 triton==3.6.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(if $(TORCH),$(BIN)/python -m pip install -q $(TORCH))
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sbtrain train recipes/copy-demo.yaml
	$(BIN)/sbtrain eval-ppl checkpoints/copy-demo/checkpoint_best.pt

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) checkpoints .pytest_cache

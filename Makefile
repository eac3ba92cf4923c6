# make demo: train + evaluate the Copy-task demo (no data needed); make test: the test suite.
# Both create .venv and install sbtrain with the CPU build of torch 2.13.0 when .venv is missing.
# With a GPU, keep your own torch: make TORCH= test (after installing torch into .venv yourself).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(if $(TORCH),$(BIN)/python -m pip install -q "$(TORCH)")
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

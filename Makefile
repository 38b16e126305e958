# make run: set up .venv and train configs/mnist_fc.yaml on MNIST; make test: set up and run the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run dense test bench gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/scoretrain fit configs/mnist_fc.yaml $(ARGS)

dense: $(STAMP)
	$(BIN)/scoretrain fit configs/mnist_dense.yaml $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

bench: $(STAMP)
	$(BIN)/scoretrain bench $(ARGS)

# On a GPU machine, with its own Python and no install step (tools/gpu_check.py; ARGS=--dry-run on a CPU)
gpu-check:
	$(PYTHON) tools/gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info

# make run: set up .venv and train configs/mnist_fc.yaml on MNIST; make test: set up and run the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run dense test bench clean

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

clean:
	rm -rf $(VENV) build *.egg-info

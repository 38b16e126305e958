# make run: set up .venv with what a run needs and train configs/mnist_fc.yaml on MNIST;
# make test: set up .venv with the test extra too and run the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN_STAMP := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test
# CuPy and NVRTC from their wheels, kept apart from the venv (where `device: auto` would find CuPy):
# only for compiling scoretrain/kernels.cu as CuPy does, on a machine without a GPU (tests/test_nvrtc.py)
NVRTC := $(VENV)/nvrtc
NVRTC_STAMP := $(NVRTC)/.installed

.PHONY: setup run dense test bench docs gpu-check clean

setup: $(RUN_STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# scoretrain and its dependencies: all that fit, eval, sweep, compare and export need
$(RUN_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

# and the test extra: pytest and the optional packages whose features the tests cover
$(TEST_STAMP): $(RUN_STAMP)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

run: $(RUN_STAMP)
	$(BIN)/scoretrain fit configs/mnist_fc.yaml $(ARGS)

dense: $(RUN_STAMP)
	$(BIN)/scoretrain fit configs/mnist_dense.yaml $(ARGS)

$(NVRTC_STAMP): $(RUN_STAMP)
	if $(BIN)/pip install --quiet --no-deps --target $(NVRTC) 'cupy-cuda13x>=14,<15' 'nvidia-cuda-nvrtc==13.*' 'cuda-pathfinder>=1.3.4,<2'; \
	then touch $@; else echo "warning: could not install CuPy and NVRTC into $(NVRTC); the NVRTC compile test will skip"; fi

test: $(TEST_STAMP) $(NVRTC_STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

bench: $(RUN_STAMP)
	$(BIN)/scoretrain bench $(ARGS)

# docs/spec.md's reference, regenerated from the help texts in scoretrain/run/config.py
docs: $(RUN_STAMP)
	$(BIN)/python tools/spec_doc.py

# On a GPU machine, with its own Python and no install step (tools/gpu_check.py; ARGS=--dry-run on a CPU)
gpu-check:
	$(PYTHON) tools/gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info

# make run: set up .venv and train configs/mnist_fc.yaml on MNIST; make test: set up and run the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CuPy and NVRTC from their wheels, kept apart from the venv (where `device: auto` would find CuPy):
# only for compiling scoretrain/kernels.cu as CuPy does, on a machine without a GPU (tests/test_nvrtc.py)
NVRTC := $(VENV)/nvrtc
NVRTC_STAMP := $(NVRTC)/.installed

.PHONY: setup run dense test bench docs gpu-check clean

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

$(NVRTC_STAMP): $(STAMP)
	if $(BIN)/pip install --quiet --no-deps --target $(NVRTC) 'cupy-cuda13x>=14,<15' 'nvidia-cuda-nvrtc==13.*' 'cuda-pathfinder>=1.3.4,<2'; \
	then touch $@; else echo "warning: could not install CuPy and NVRTC into $(NVRTC); the NVRTC compile test will skip"; fi

test: $(STAMP) $(NVRTC_STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

bench: $(STAMP)
	$(BIN)/scoretrain bench $(ARGS)

# docs/spec.md's reference, regenerated from the help texts in scoretrain/run/config.py
docs: $(STAMP)
	$(BIN)/python tools/spec_doc.py

# On a GPU machine, with its own Python and no install step (tools/gpu_check.py; ARGS=--dry-run on a CPU)
gpu-check:
	$(PYTHON) tools/gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info

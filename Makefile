# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: setup test test-all demo bench lint gpu-check

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# The CPU build of torch (a bare `torch` would pull a multi-GB CUDA build).
	$(PIP) torch==2.13.0
	# plot: matplotlib, for the demo's size-against-perplexity PNG.
	$(PIP) -e ".[triton,test,plot]"
	# Optional: the original diffq, for side-by-side parity tests and benchmarks.
	-$(PIP) cython && $(PIP) --no-build-isolation diffq==0.2.4
	touch $@

# The kernel tests skip without Triton (a bare install); here Triton is installed, so its
# absence must fail the run, not skip the kernel files.
test: setup
	DIFFQ_TRITON_REQUIRE_TRITON=1 $(PY) -m pytest

test-all: setup
	$(PY) -m pytest -m ""

demo: setup
	$(VENV)/bin/diffq-triton demo

bench: setup
	$(PY) -m pytest bench -p no:cacheprovider -m "" --benchmark-disable-gc

lint: setup
	$(VENV)/bin/ruff check .

# On a machine with a CUDA GPU: GPU_PY is a Python whose torch and triton are CUDA builds
# (not the CPU wheel `setup` installs). The package is installed into it in editable mode,
# without dependencies; the check then runs the kernel tests on the GPU, the benchmarks and
# the demo (bench/gpu_check.py). Without a GPU it says so and fails.
GPU_PY ?= python3
gpu-check:
	$(GPU_PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(GPU_PY) bench/gpu_check.py $(if $(GPU_CHECK_ONLY),--only $(GPU_CHECK_ONLY))

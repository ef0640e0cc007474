# Set-up and the everyday commands.  `make evaluate`, `make demo` and `make test` create the virtual
# environment on first use (torch 2.14.1 + torchvision 0.29.1 come from the machine's local
# package cache), install relprop editable with its test extras, then run.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.relprop-installed

.PHONY: install evaluate demo test test-fast golden gpu-wheels

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

evaluate: $(STAMP)
	$(BIN)/relprop evaluate --out relprop-report

demo: $(STAMP)
	$(BIN)/relprop demo --out relprop-demo

# The Triton kernel tests (and the triton cases of tests/test_primitives.py) run in a process of
# their own: on CPU they need TRITON_INTERPRET=1 set before Triton is imported, and the rest of
# the suite runs without it.
test: $(STAMP)
	$(BIN)/python -m pytest
	TRITON_INTERPRET=1 $(BIN)/python -m pytest tests/test_triton_kernels.py tests/test_primitives.py -k triton

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"
	TRITON_INTERPRET=1 $(BIN)/python -m pytest tests/test_triton_kernels.py tests/test_primitives.py -k triton

# The maintainers' checker over the full golden set, which sits beside the repository, not in
# it; from a clone alone `make test` checks the in-repo subset tests/data/golden instead.
golden: $(STAMP)
	@if [ ! -f ../shared/golden/check.py ]; then \
	  echo "make golden: ../shared/golden/check.py not found.  The full golden set and the maintainers'" >&2; \
	  echo "checker sit beside the repository (../shared/golden), not in it, so there is nothing to run." >&2; \
	  echo "From a clone alone, 'make test' checks the in-repo golden subset tests/data/golden." >&2; \
	  exit 2; \
	fi
	$(BIN)/python ../shared/golden/check.py --golden ../shared/golden --impl golden_adapter:explain --pythonpath tests

# The comparison libraries the GPU machine's image lacks (Zennit, Captum; their own needs are
# there), as wheels for its Python 3.12 in .whl/, which bench/gpu_session.sh installs; pass
# `.whl` in the device call's carry.  Pure-Python wheels, the versions this venv tests against.
ZENNIT_VERSION ?= 0.5.1
CAPTUM_VERSION ?= 0.9.0
gpu-wheels:
	rm -rf .whl && $(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
	  zennit==$(ZENNIT_VERSION) captum==$(CAPTUM_VERSION)
	@ls .whl

# Set-up and the everyday commands.  `make evaluate`, `make demo` and `make test` create the virtual
# environment on first use (torch 2.14.1 + torchvision 0.29.1 come from the machine's local
# package cache), install relprop editable with its test extras, then run.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.relprop-installed

.PHONY: install evaluate demo test test-fast golden

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

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

golden: $(STAMP)
	$(BIN)/python ../shared/golden/check.py --golden ../shared/golden --impl golden_adapter:explain --pythonpath tests

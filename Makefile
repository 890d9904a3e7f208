# Two commands set everything up on a fresh machine:
#   make demo   -- venv + install + the end-to-end demo on CPU with bundled defaults
#   make test   -- venv + install + ruff (lint, format) + pytest
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.vidtrain-installed
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: demo demo-i2v test lint imports format install clean

$(STAMP): setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch first (on local disk here); setup.py keeps a range CUDA users meet.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# vidtrain/kernels, vidtrain/data_tools and vidtrain/launch are links to the top-level folders, so
# the source tree has the installed layout (setup.py's package_dir) and lint-imports reads it as is
imports: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python tools/check_imports.py vidtrain kernels data_tools launch

test: lint imports
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python -m vidtrain.demo --out $(DEMO_DIR)

# the image-to-video demo (Wan2.2-shaped pair): runs/demo_i2v/
demo-i2v: $(STAMP)
	$(BIN)/python -m vidtrain.demo --i2v --out runs/demo_i2v

clean:
	rm -rf $(VENV) runs build *.egg-info

# Set-up and entry points. Every target installs what it needs on a fresh machine.
#   make demo   the main job on real data (Fashion-MNIST): deepclean run
#   make test   the linter and the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision pinned to the releases this project is tested with; override on other machines,
# e.g. make test TORCH_SPEC="torch torchvision"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
RUN_ARGS ?=

.PHONY: setup data demo test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

data:
	bash scripts/get-fashion-mnist.sh

demo: setup data
	$(VENV)/bin/deepclean run $(RUN_ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks examples

test: setup data lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info

# The two commands of the README, each setting itself up from nothing.
#   make demo   train SimCLR on the offline digits set and compare with the untrained backbone
#   make test   lint and run the test suite

VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin
STAMP := $(VENV)/.sslzoo-installed

.PHONY: demo test lint install clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/sslzoo quickstart

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	$(BIN)/pytest -q --durations=12 -n 2 --dist loadgroup

clean:
	rm -rf $(VENV) runs

# sdbuild: `make` builds the default recipe, `make test` runs the tests, `make <recipe>` builds
# recipes/<recipe>.yaml. Every target sets up the virtual environment first when it is missing or
# older than the dependency files.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RECIPES := $(basename $(notdir $(wildcard recipes/*.yaml)))

.DEFAULT_GOAL := build
.PHONY: build test setup bench clean-artifacts $(RECIPES)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $@

setup: $(STAMP)

build: tiny-sd

$(RECIPES): $(STAMP)
	$(BIN)/sdbuild build recipes/$@.yaml

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/build_bench.py

clean-artifacts:
	find artifacts -mindepth 1 -not -name .gitkeep -delete

# sdbuild: `make` builds the default recipe, `make test` runs the tests, `make <recipe>` builds
# recipes/<recipe>.yaml. Every target sets up the virtual environment first when it is missing or
# older than the lock: every dependency comes from requirements.lock with its hashes checked.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements.lock
LOCK_PYTHON := 3.11
RECIPES := $(basename $(notdir $(wildcard recipes/*.yaml)))
RECIPE ?= tiny-sd
# Where torch's Linux CPU wheel (2.13.0+cpu) is found: it is not on PyPI (PyPI's Linux wheel is the
# CUDA build). A folder pip is already told about (PIP_FIND_LINKS), else the torch page of PyTorch's
# CPU index, read as a page of links so that no other package comes from that index.
TORCH_WHEELS ?= $(or $(PIP_FIND_LINKS),https://download.pytorch.org/whl/cpu/torch/)
PIP := $(BIN)/python -m pip --disable-pip-version-check

.DEFAULT_GOAL := build
.PHONY: build test setup bench lint lock release-dry-run clean-artifacts $(RECIPES)

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --require-hashes --only-binary :all: --find-links $(TORCH_WHEELS) -r $(LOCK)
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
	touch $@

setup: $(STAMP)

build: tiny-sd

$(RECIPES): $(STAMP)
	$(BIN)/sdbuild build recipes/$@.yaml

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/build_bench.py

# actionlint checks the workflows (with the locked shellcheck on their `run:` steps); ruff the Python;
# mypy the types of builder/ (settings in pyproject.toml).
lint: $(STAMP)
	$(BIN)/actionlint -shellcheck $(BIN)/shellcheck .github/workflows/*.yml
	$(BIN)/ruff check builder tests bench
	$(BIN)/ruff format --check builder tests bench
	$(BIN)/mypy

# Re-resolve requirements.lock from pyproject.toml, lock.in and constraints.txt, with every file's
# hash, for Linux x86_64 and macOS arm64 (pyproject.toml's [tool.uv] environments).
lock: $(STAMP)
	$(BIN)/uv pip compile --universal --python-version $(LOCK_PYTHON) --generate-hashes --quiet \
		--custom-compile-command "make lock (uv pip compile --universal --python-version $(LOCK_PYTHON))" \
		--find-links $(TORCH_WHEELS) \
		--extra test --extra dev --extra remote --constraint constraints.txt pyproject.toml lock.in --output-file $(LOCK)

# The Linux half of .github/workflows/release.yml, for RECIPE (default tiny-sd): fetch, build,
# release into dist/, then rebuild the archive from its manifest in a fresh workspace and compare.
release-dry-run: $(STAMP)
	$(BIN)/sdbuild fetch recipes/$(RECIPE).yaml
	$(BIN)/sdbuild build recipes/$(RECIPE).yaml
	archive="$$($(BIN)/sdbuild release recipes/$(RECIPE).yaml --out dist | sed 's/^[0-9a-f]*  //')" && \
		$(BIN)/sdbuild reproduce "$$archive"

clean-artifacts:
	find artifacts -mindepth 1 -not -name .gitkeep -delete

# unbrick: two commands matter.
#   make demo   set up, then show the main job on sample images it generates
#   make test   set up (Debian packages too, when run as root), then run every check and test

PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test setup deps lint typecheck contracts pytest bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,dev]'
	$(BIN)/python -m compileall -q src
	touch $(STAMP)

setup: $(STAMP)

# Debian packages the tests cross-check against; installed only when running as root.
deps:
	./scripts/install-deps

demo: setup
	$(BIN)/python scripts/demo.py

lint: setup
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts

typecheck: setup
	$(BIN)/mypy

contracts: setup
	$(BIN)/lint-imports

pytest: setup
	$(BIN)/pytest -m "not hardware" -n auto --cov=unbrick --cov-report=term:skip-covered --cov-fail-under=85

test: deps setup lint typecheck contracts pytest

bench: setup deps
	$(BIN)/python bench/run.py
	$(BIN)/python bench/tftp_bench.py --no-sweep
	$(BIN)/python bench/xymodem_bench.py --sizes 256K --repeat 3
	$(BIN)/python bench/flashrom_bench.py --repeat 7
	$(BIN)/python bench/fastboot_bench.py --repeat 9
	$(BIN)/python bench/block_bench.py --repeat 5

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache

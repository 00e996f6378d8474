# Each target creates .venv on first use, so a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint format bench browser clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,bench]"
	touch $(STAMP)

# Headless Chromium for the report's browser test: Debian's package, never a downloaded build.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "install Debian's chromium package for the browser tests"; fi; }

demo: $(STAMP)
	$(BIN)/distgraph demo --backend ray --workers 2 --strategy round_robin --report report.html
	$(BIN)/distgraph train linear --backend ray --workers 2

test: $(STAMP) browser
	$(BIN)/ruff check distgraph tests examples deploy
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check distgraph tests examples deploy
	$(BIN)/ruff format --check distgraph tests examples deploy
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format distgraph tests examples deploy
	$(BIN)/ruff check --fix distgraph tests examples deploy

bench: $(STAMP)
	$(BIN)/distgraph bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

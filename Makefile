# callmesh — the two commands: `make up` (run a local cluster) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
UP_STAMP := $(VENV)/.installed-up

.PHONY: up install test lint typecheck pytest bench clean

up: $(UP_STAMP)
	$(BIN)/callmesh up

install: $(STAMP)

# Extras by role (pyproject.toml): `make up` needs the embedded servers ([local]) and the
# provider SDKs an API key may switch on ([voice]); tests, lint and benchmarks need [dev],
# which holds every extra.
$(UP_STAMP): EXTRAS := local,voice,speech
$(STAMP): EXTRAS := dev
$(STAMP) $(UP_STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "callmesh needs Python 3.11+")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[$(EXTRAS)]'
	touch $@

# ruff (lint and formatting), then the layering contracts of pyproject.toml
# ([tool.importlinter]).
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

typecheck: install
	$(BIN)/mypy

# pytest exits 5 when it collected no test: that is a failure here, never a silent pass.
pytest: install
	$(BIN)/python -m pytest -q

test: lint typecheck pytest

# The standard scenarios (bench/suite.py --list), about 10 minutes here: reports in
# out/bench/, figures in bench/results.json, tables of docs/benchmarks.md regenerated.
bench: install
	$(BIN)/python bench/suite.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache out

# The two commands of the README (and test-fast, its developer section's). Each creates .venv from pyproject.toml
# on first use.
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= 2

.PHONY: study test test-fast lint

$(BIN)/.installed: pyproject.toml workflow/executor/pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]' ./workflow/executor
	touch $@

# The embedded study end to end: data, tokenizer, metric classifier, teachers, students, metrics, tables.
study: $(BIN)/.installed
	PATH="$(abspath $(BIN)):$$PATH" snakemake --cores $(CORES) all

test: lint
	PATH="$(abspath $(BIN)):$$PATH" pytest

# Everything but the tests marked slow (end-to-end and model-sized ones; CI runs all): under 3 min on 2 cores.
test-fast: lint
	PATH="$(abspath $(BIN)):$$PATH" pytest -m "not slow"

# Unused imports and names, undefined names, shadowed definitions: seconds, so every test run starts with it.
lint: $(BIN)/.installed
	$(BIN)/pyflakes varkd tests benchmarks workflow/executor/snakemake_executor_plugin_submitit

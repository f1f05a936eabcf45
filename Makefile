# bqat: `make train` runs the default experiment, `make test` runs the test suite,
# `make bench` times block replacement against plain QAT (outputs/bench/bench.json).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install train test bench
install: $(STAMP)

# Re-install only when the project metadata changes; editable, so conf/ is found in place.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev,export]"
	touch $(STAMP)

train: install
	$(BIN)/bqat-train $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: install
	$(BIN)/python scripts/bench.py $(BENCH_ARGS)

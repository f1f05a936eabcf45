# bqat: `make train` runs the default experiment, `make test` runs the test suite,
# `make bench` times block replacement against plain QAT (outputs/bench/bench.json).
# `make reproduce` the paper tables (README, "Reproducing the tables"), `make reproduce-smoke` the same on digits.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install train test bench reproduce reproduce-smoke
install: $(STAMP)

# Re-install only when the project metadata changes; editable, so conf/ is found in place.
# brevitas, lightning: the extras examples/ uses, so their tests run in CI.
$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev,export,brevitas,lightning]"
	touch $(STAMP)

train: install
	$(BIN)/bqat-train $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: install
	$(BIN)/python scripts/bench.py $(BENCH_ARGS)

# Data roots, budget and extra overrides reach scripts/reproduce.py as options; unset ones are left out.
REPRO_OPTS = $(if $(CIFAR10),--cifar10 $(CIFAR10)) $(if $(IMAGENET),--imagenet $(IMAGENET)) \
             $(if $(TABLES),--tables $(TABLES)) $(if $(EPOCHS),--epochs $(EPOCHS)) \
             $(if $(PARTNER_EPOCHS),--partner-epochs $(PARTNER_EPOCHS)) $(if $(SEEDS),--seeds $(SEEDS)) \
             $(if $(DRY),--dry-run)

reproduce: install
	$(BIN)/python scripts/reproduce.py $(REPRO_OPTS) -- $(ARGS)

reproduce-smoke: install
	$(BIN)/python scripts/reproduce.py --smoke $(REPRO_OPTS) -- $(ARGS)

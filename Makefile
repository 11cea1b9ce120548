# fedsynth: the two set-up commands are `make demo` and `make test` (see README "Quick start").
# Both create .venv/ in the project root and install everything; only python3 is needed.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1

.PHONY: demo test lint typecheck pytest clean help

help:
	@echo "make demo   set up .venv, then the default simulated experiment (phantom consortium,"
	@echo "            federation, baselines, report in $(DEMO_DIR)/report.md)"
	@echo "make test   set up .venv, then lint, type-check and run the whole test suite"

# torch first, pinned: here 2.13.0 is a local CPU build; on a hospital GPU box the same pin takes
# the CUDA build. Installing it first keeps the range in pyproject.toml from pulling another one.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: $(STAMP)
	$(BIN)/fedsynth simulate --run-dir $(DEMO_DIR) --overwrite

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy reads the package as it is installed (fedsynth/server, ...): links in .venv/mypy-path/.
typecheck: $(STAMP)
	mkdir -p $(VENV)/mypy-path/fedsynth
	for folder in cli client common server simulations; do \
		ln -sfn "$(CURDIR)/$$folder" "$(VENV)/mypy-path/fedsynth/$$folder"; done
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest

test: lint typecheck pytest

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache

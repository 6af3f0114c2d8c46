# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
# Both create .venv from nothing when it is missing and install with constraints.txt.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export PYTHONDONTWRITEBYTECODE :=

.PHONY: venv run test test-fast lint format bench bench-quality bench-gate bench-lake serve dashboard clean

venv: $(STAMP)

# uv installs the ~250 pinned packages in parallel (about 2x faster than pip here). It ignores
# pip's config, so pip's find-links folder (where the local CPU torch wheel lives) is passed on.
# No --compile-bytecode: with PYTHONDONTWRITEBYTECODE emptied above, Python compiles what a run
# imports on first use (seconds), where compiling all 40k files of the venv took two minutes.
FIND_LINKS ?= $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
UV_FLAGS := --quiet $(if $(FIND_LINKS),--find-links $(FIND_LINKS))

$(STAMP): pyproject.toml constraints.txt
	@echo "installing the project into $(VENV) (first run only)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install -qq --disable-pip-version-check -c constraints.txt uv
	@$(BIN)/uv pip install --python $(BIN)/python $(UV_FLAGS) -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

# Supervised: SIGTERM or Ctrl-C stops the flow and its temporary Prefect server within 10 s.
# `make run RUN_ARGS=--verbose` shows the libraries' own output too.
RUN_ARGS ?=
run: venv ## the main job, end to end on embedded defaults
	@$(BIN)/python -m hap.core.procs $(BIN)/python -m flows.main $(RUN_ARGS)

lint: venv ## ruff: lint and format check (make test runs it first)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Two workers (one per core), one test file per worker: a file's module fixtures (a simulated window,
# a trained bundle, a Prefect or MLflow server) are built once, and much of the suite waits on
# subprocesses and servers, so the two cores stay busy.
test: lint ## the whole test suite (unit, data, model, system), after the linter
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow and not integration"

bench: venv
	$(BIN)/python -m bench.run_all

bench-quality: venv
	$(BIN)/python -m bench.paper_table

bench-gate: venv ## the gate's A/A promotion and degraded-challenger rejection rates (bench/results/gate_power.md)
	nice -n 5 $(BIN)/python -m bench.bench_gate

bench-lake: venv ## the lake (Delta) on local disk and on an S3 server vs plain pyarrow (bench/results/lake.md)
	nice -n 5 $(BIN)/python -m bench.bench_lake --requests 100000

serve: venv ## serve the daily deployment on this machine (needs a Prefect server)
	$(BIN)/hap schedule

dashboard: venv
	$(BIN)/hap dashboard

clean:
	rm -rf data .dvc/tmp .pytest_cache

# bigtent: `make demo` runs a local farm and builds an example; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test test-postgresql lint format deps venv bench clean

deps:
	@scripts/install-deps.sh

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

demo: deps venv
	$(BIN)/python examples/demo.py

# BIGTENT_TEST_DB=postgresql runs every test on PostgreSQL (throwaway clusters) instead.
test: deps venv
	$(BIN)/pytest -n 2 $(PYTEST_ARGS)

test-postgresql:
	BIGTENT_TEST_DB=postgresql $(MAKE) test

lint: venv
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples
	$(BIN)/mypy
	$(BIN)/actionlint

format: venv
	$(BIN)/ruff format src tests bench examples
	$(BIN)/ruff check --fix src tests bench examples

# Benchmarks (docs/benchmarks.md): minutes each at full size; BENCH_FLAGS=--quick for a smoke run.
BENCH_FLAGS ?=
bench: deps venv
	$(BIN)/python bench/dag.py $(BENCH_FLAGS)
	$(BIN)/python bench/scheduler.py $(BENCH_FLAGS)
	$(BIN)/python bench/fanin.py $(BENCH_FLAGS)
	$(BIN)/python bench/cache.py $(BENCH_FLAGS)
	$(BIN)/python bench/forge.py $(BENCH_FLAGS)
	$(BIN)/python bench/nixhook.py $(BENCH_FLAGS)
	$(BIN)/python bench/logretention.py $(BENCH_FLAGS)
	$(BIN)/python bench/drvingest.py $(BENCH_FLAGS)
	$(BIN)/python bench/eval.py $(BENCH_FLAGS)
	$(BIN)/python bench/gc.py $(BENCH_FLAGS)
	$(BIN)/python bench/requests_cpu.py $(BENCH_FLAGS)

clean:
	rm -rf $(VENV) .bigtent-demo .mypy_cache .ruff_cache .pytest_cache

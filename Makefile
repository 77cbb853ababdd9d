# One command per habit. CI calls the same targets (see .ci/run).
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: venv demo test test-fast lint bench bench-smoke chaos clean tools mutate screenshots

venv: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $(STAMP)

## tools: system tools some checks need (promtool); installs them when missing and allowed.
tools:
	@bash .ci/tools.sh

demo: venv
	$(BIN)/dispatcher demo

lint: venv
	$(BIN)/ruff check dispatcher tests grafana deploy
	$(BIN)/ruff format --check dispatcher tests grafana deploy
	$(BIN)/mypy

# Two xdist workers, a test file per worker at a time (module fixtures built once, the chaos
# scenarios one after another): most tests wait on sockets and child processes, not CPU.
PYTEST_WORKERS ?= 2

test: venv lint
	$(BIN)/pytest -q -p no:cacheprovider -n $(PYTEST_WORKERS) --dist loadfile

test-fast: venv
	$(BIN)/pytest -q -x -p no:cacheprovider tests/unit

bench: venv
	$(BIN)/dispatcher bench

# The console's screenshots in docs/, taken by its browser tests (needs chromium: make tools).
screenshots: venv
	CONSOLE_SCREENSHOTS=1 $(BIN)/pytest -q -p no:cacheprovider tests/browser

chaos: venv
	DISPATCHER_CHAOS_LONG=1 $(BIN)/pytest -q -p no:cacheprovider tests/chaos

## mutate: mutation testing (mutmut 3, settings in pyproject.toml) of the pure modules against
## their unit tests, one module at a time, each bounded by MUTATE_TIMEOUT seconds; then the
## killed % per module (mutants that only reword an error message left out). Slow: not part
## of `make test`. Logs in mutants/<module>.log.
MUTATE_MODULES ?= backoff ssrf signing receiver secretbox
MUTATE_TIMEOUT ?= 1800
MUTATE_CHILDREN ?= 2

mutate: venv
	@mkdir -p mutants
	@for m in $(MUTATE_MODULES); do \
		echo "mutmut: dispatcher.$$m"; \
		timeout $(MUTATE_TIMEOUT) $(BIN)/mutmut run --max-children $(MUTATE_CHILDREN) \
			"dispatcher.$$m*" > mutants/$$m.log 2>&1 || { tail -n 20 mutants/$$m.log; exit 1; }; \
	done
	$(BIN)/python -m tests.mutation_score $(MUTATE_MODULES)

clean:
	rm -rf $(VENV) .dispatcher build *.egg-info .mypy_cache .ruff_cache mutants

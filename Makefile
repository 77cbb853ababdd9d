# One command per habit. CI calls the same targets (see .ci/run).
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: venv demo test test-fast lint bench bench-smoke chaos clean tools screenshots

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

clean:
	rm -rf $(VENV) .dispatcher build *.egg-info .mypy_cache .ruff_cache

# `make demo` and `make test` bootstrap .venv from the python3 on PATH; both are idempotent and
# fast on a second run (the install is redone only when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint typecheck pytest bench scale overhead retention clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --disable-pip-version-check -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	touch $(VENV)/.installed $@

demo: $(VENV)/.installed
	$(BIN)/python -m monitor.demo
	@echo "execmon is installed in $(VENV), not on your PATH: run '. $(BIN)/activate' first, or call $(BIN)/execmon"

lint: $(VENV)/.installed-test
	$(BIN)/ruff check monitor tests benchmarks examples
	$(BIN)/ruff format --check monitor tests benchmarks examples
	$(BIN)/lint-imports --no-cache --no-logo

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy

# Four pytest-xdist workers: the suite mostly waits on real servers and subprocesses (on 2 CPUs,
# 12.5 min in one process, under 8 with four). tests/e2e.py's free_port keeps workers' ports apart.
pytest: $(VENV)/.installed-test
	$(BIN)/pytest -q -p no:cacheprovider -n 4 --cov --cov-report=term:skip-covered

test: lint typecheck pytest

# The public scenarios (in-repo copies of ../shared/scenarios, so a clone has them), then our own.
# A file that `execmon bench` rejects (exit 2: e.g. an optional key the simulator does not support
# yet) is reported as skipped and the rest still run; any other failure stops the target.
BENCH_SCENARIOS = benchmarks/scenarios/public/*.toml benchmarks/scenarios/public/beyond-linear/*.toml \
	benchmarks/scenarios/*.toml

bench: $(VENV)/.installed
	@err=$$(mktemp); ran=0; skipped=0; \
	for s in $(BENCH_SCENARIOS); do \
	  rc=0; $(BIN)/execmon bench --scenario $$s 2>$$err || rc=$$?; \
	  if [ $$rc -eq 2 ]; then \
	    echo "skipped $$s: $$(sed -e 's/^execmon bench: //' -e "s|^$$s: ||" $$err)"; skipped=$$((skipped + 1)); \
	  else \
	    cat $$err >&2; [ $$rc -eq 0 ] || { rm -f $$err; exit $$rc; }; ran=$$((ran + 1)); echo; \
	  fi; \
	done; \
	rm -f $$err; echo "make bench: $$ran scenarios benchmarked, $$skipped skipped"

# Scheduling cost per decision at 1k-100k executions, then the cost of the whole core: the Monitor's
# polls/s against a bare aiohttp loop, no rate limit (exits non-zero below 0.5x; not a test).
scale: $(VENV)/.installed
	$(BIN)/python benchmarks/scale.py
	$(MAKE) --no-print-directory overhead

overhead: $(VENV)/.installed
	$(BIN)/python benchmarks/core_overhead.py

# Bounded state: start-up, GET latency, memory and pruning with 10k vs 1M delivered results (not a test).
retention: $(VENV)/.installed
	$(BIN)/python benchmarks/state_retention.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .coverage

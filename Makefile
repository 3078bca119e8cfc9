# `make test` and (later) `make demo` are the two commands a fresh machine needs.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
export GLOG_v ?= 3

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Both cores: one pytest worker each (pytest-xdist). A file's tests stay on one worker, the longest
# files start first (tests/conftest.py); `make test PARALLEL=` runs everything in one process.
PARALLEL ?= -n 2 --dist loadfile --no-loadscope-reorder

test: $(VENV)/.installed
	$(PY) -m pytest tests $(PARALLEL) --durations=15

# The fast tier for development: everything but the end-to-end runs marked `slow` (whole commands in
# subprocesses, minutes each). `make test` still runs everything.
test-fast: $(VENV)/.installed
	$(PY) -m pytest tests $(PARALLEL) -m "not slow"

# The whole product on synthetic sky videos: data -> latte ingest -> latte train -> latte sample.
demo: $(VENV)/.installed
	$(PY) demo/run_demo.py

.PHONY: install test test-fast demo

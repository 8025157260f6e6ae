# Two commands on a fresh machine: `make up` runs Dalston with its default model, `make test`
# runs the test suite. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: up test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,nemo]'
	touch $@

up: $(VENV)/.installed
	$(VENV)/bin/dalston up

test: $(VENV)/.installed
	scripts/system-deps
	$(PY) -m pytest

bench: $(VENV)/.installed
	scripts/system-deps
	$(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache

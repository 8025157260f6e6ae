# Two commands on a fresh machine: `make up` runs Dalston with its default model, `make test`
# runs the test suite. Both create .venv on first use; the tests add the test, NeMo and diarize extras.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q

.PHONY: up test bench clean

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.created
	$(PIP) -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.created
	$(PIP) -e '.[test,nemo,diarize]'
	touch $@ $(VENV)/.installed

up: $(VENV)/.installed
	$(VENV)/bin/dalston up

test: $(VENV)/.installed-test
	scripts/system-deps
	$(PY) -m pytest

bench: $(VENV)/.installed-test
	scripts/system-deps
	$(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache

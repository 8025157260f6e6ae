# Two commands on a fresh machine: `make up` runs Dalston with its default model, `make test`
# runs the test suite. Both create .venv on first use; the tests add the test, NeMo and diarize extras.
# `make test-fast` runs the tests that need no nats-server (the services on the in-memory bus).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q

.PHONY: up test test-fast bench clean

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

# pytest-xdist workers: 0 runs the suite in one process (the default: CI's). On two cores, 2
# workers took 14 min against 20-23 in one process, since much of the suite waits (services,
# audio at 1x speed); in three runs on a loaded machine, two had one test each whose own wait or
# check was too tight for the load (both widened since, but not yet run twice clean in a row).
TEST_WORKERS ?= 0

test: $(VENV)/.installed-test
	scripts/system-deps
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

# Static, pure and in-process tests: no nats-server, no process started.
FAST_TESTS := tests/test_layers.py tests/test_delivery.py tests/test_inprocess.py tests/test_dag.py \
	tests/test_intake.py tests/test_model_manager.py tests/test_loops.py tests/test_tracing.py \
	tests/test_live_final.py

test-fast: $(VENV)/.installed-test
	$(PY) -m pytest -q $(FAST_TESTS)

bench: $(VENV)/.installed-test
	scripts/system-deps
	$(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache

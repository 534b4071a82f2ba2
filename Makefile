# nanoEMO's two commands: `make demo` (the main job) and `make test` (the tests).
# Both install the pinned requirements into .venv first (once, again when requirements.txt changes).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test

$(VENV)/installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

test: $(VENV)/installed
	$(PY) -m pytest -q

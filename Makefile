# Two commands do all the set-up (see README.md):
#   make run    install into .venv/ if needed, then train/export/publish the quick preset
#   make test   install into .venv/ if needed, then run the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt pyproject.toml | sha256sum | cut -c1-16)
export BENTOML_DO_NOT_TRACK := True

.PHONY: setup run test serve report

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null || \
	  { echo "error: Python >= 3.10 is needed as '$(PYTHON)' (set PYTHON=/path/to/python3.11)"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || \
	  { echo "error: '$(PYTHON) -m venv' failed: install the venv module (Debian: python3-venv)"; exit 1; }
	@echo "installing requirements.txt into $(VENV)/ (a few minutes the first time) ..."
	@$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt || \
	  { echo "error: could not install requirements.txt: is a package index (PyPI or a mirror) reachable?"; exit 1; }
	@$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . || \
	  { echo "error: could not install this project into $(VENV)/ (pip install -e .)"; exit 1; }
	@rm -f $(VENV)/.installed-* && touch $@ && echo "$(VENV)/ is ready"

run: setup
	$(PY) training/run_all.py $(ARGS)

test: setup
	$(PY) -m pytest $(ARGS)

report: setup
	$(PY) bench/report.py $(ARGS)

serve: setup
	$(VENV)/bin/bentoml serve --host $${HOST:-127.0.0.1} --port $${PORT:-3000}

# Two commands do all the set-up (see README.md):
#   make run    install into .venv/ if needed, then train/export/publish the quick preset
#   make test   install into .venv/ if needed (and Chromium for the browser tests, as root), then run the test suite
# The environment is requirements.lock, every package pinned with its hashes; `make lock` remakes it from
# requirements.in (the direct dependencies), and tests/test_environment.py checks .venv/ equals it.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | sha256sum | cut -c1-16)
export BENTOML_DO_NOT_TRACK := True

.PHONY: setup browser run test serve report lock

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || \
	  { echo "error: Python >= 3.11 is needed as '$(PYTHON)' (set PYTHON=/path/to/python3.11)"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || \
	  { echo "error: '$(PYTHON) -m venv' failed: install the venv module (Debian: python3-venv)"; exit 1; }
	@echo "installing requirements.lock into $(VENV)/ (a few minutes the first time) ..."
	@$(PY) -m pip install -q --disable-pip-version-check --require-hashes --no-deps -r requirements.lock \
	  >$(VENV)/install.log 2>&1 || { grep -v 'is ignored: it is neither' $(VENV)/install.log | tail -20; \
	  echo "error: could not install requirements.lock (log: $(VENV)/install.log): is a package index reachable?"; exit 1; }
	@$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . || \
	  { echo "error: could not install this project into $(VENV)/ (pip install -e .)"; exit 1; }
	@$(PY) -m pip check -q >/dev/null || { $(PY) -m pip check; echo "error: requirements.lock is inconsistent (make lock)"; exit 1; }
	@rm -f $(VENV)/.installed-* && touch $@ && echo "$(VENV)/ is ready"

# Remake requirements.lock from requirements.in with the pinned uv, on the indexes pip is configured with
# here (pip config), for CPython >= 3.11 on any platform. Then run `make test`: the compat tests say
# whether new versions of the guarded packages are safe.
lock: setup
	@args=""; for u in $$($(PY) -m pip config get global.extra-index-url 2>/dev/null); do args="$$args --extra-index-url $$u"; done; \
	for u in $$($(PY) -m pip config get global.find-links 2>/dev/null); do args="$$args --find-links $$u"; done; \
	$(VENV)/bin/uv pip compile requirements.in --universal --python-version 3.11 --generate-hashes \
	  --index-strategy unsafe-best-match --custom-compile-command "make lock" $$args -o requirements.lock

run: setup
	$(PY) training/run_all.py $(ARGS)

# Chromium for the browser tests (tests/test_browser.py): Debian's `chromium`, installed once with apt-get
# when this runs as root with apt-get; anywhere else (or if apt-get fails) those tests skip and say why.
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
	  echo "note: no Chromium here, and no root + apt-get to install it: the browser tests will skip"; \
	else \
	  echo "installing Chromium for the browser tests (apt-get install chromium, once) ..."; \
	  mkdir -p .cache; \
	  apt="apt-get -y -q -o DPkg::Lock::Timeout=300"; \
	  if { DEBIAN_FRONTEND=noninteractive $$apt install chromium || \
	       { DEBIAN_FRONTEND=noninteractive $$apt update && DEBIAN_FRONTEND=noninteractive $$apt install chromium; }; \
	     } </dev/null >.cache/chromium-install.log 2>&1; then echo "Chromium is installed: $$(command -v chromium)"; \
	  else echo "note: apt-get could not install chromium (see .cache/chromium-install.log): the browser tests will skip"; fi; \
	fi

test: setup browser
	$(PY) -m pytest $(ARGS)

report: setup
	$(PY) bench/report.py $(ARGS)

serve: setup
	@echo "serving on http://$${HOST:-127.0.0.1}:$${PORT:-3000}/ : open it for the try-it page (API docs: /docs)"
	$(VENV)/bin/bentoml serve --host $${HOST:-127.0.0.1} --port $${PORT:-3000}

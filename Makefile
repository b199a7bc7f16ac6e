# StructGuard Studio: the two user commands.
#   make run    set up, then start the dashboard on http://localhost:8501
#   make test   set up, then run the tests
# `make run` installs the run-time packages (requirements.txt); `make test` adds the test and tooling
# packages (requirements-dev.txt). Setup is idempotent: each set is reinstalled only when its files change
# (a stamp file in .venv per set, keyed on their checksum); Debian packages are checked with dpkg.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8501
HOST ?= 127.0.0.1
PYTEST_ARGS ?=
APT_PACKAGES := chromium chromium-driver dataset-fashion-mnist
REQS := requirements.txt requirements-lock.txt
DEV_REQS := requirements-dev.txt requirements-ray.txt requirements-dev-lock.txt
STAMP := $(VENV)/.installed-run-$(shell cat $(REQS) 2>/dev/null | cksum | cut -d' ' -f1)
DEV_STAMP := $(VENV)/.installed-dev-$(shell cat $(DEV_REQS) 2>/dev/null | cksum | cut -d' ' -f1)

# Nothing downloads at run time; downloads need HF_HUB_OFFLINE=0 and STRUCTGUARD_ALLOW_DOWNLOADS=1 (core/downloads.py).
export HF_HUB_OFFLINE ?= 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: run test setup python-deps python-dev-deps system-deps

# HOST=0.0.0.0 (or an address of this machine) exposes the dashboard on a network, e.g. for a classroom.
run: setup
	@if [ "$(HOST)" != 127.0.0.1 ] && [ "$(HOST)" != localhost ]; then \
		echo "warning: the dashboard listens on $(HOST):$(PORT): anyone who can reach this machine there can start"; \
		echo "         runs and read the runs that are not a session's own. Use it on a network you trust."; \
	fi
	@echo "StructGuard Studio: http://localhost:$(PORT)  (Ctrl+C stops it)"
	$(PY) -m streamlit run dashboard/app.py --server.port $(PORT) --server.address $(HOST) --server.headless true \
		--browser.gatherUsageStats false

# pytest's exit code is kept in test-artifacts/pytest-exit-code (.ci/run reads it).
test: setup python-dev-deps
	@mkdir -p test-artifacts; rc=0; \
	$(PY) -m pytest $(PYTEST_ARGS) || rc=$$?; \
	echo $$rc > test-artifacts/pytest-exit-code; exit $$rc

setup: python-deps system-deps

python-deps: $(STAMP)

$(STAMP):
	@test -x $(PY) || { echo "creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }
	@echo "installing Python packages into $(VENV) (the first time: a few minutes, about 6 GB with torch)"
	$(PY) -m pip install --quiet --progress-bar off -r requirements.txt -c requirements-lock.txt
	@rm -f $(VENV)/.installed-run-* $(VENV)/.installed-[0-9]*; touch $@

# Test and tooling packages, only for `make test`; redone after the run-time set was (re)installed.
python-dev-deps: $(DEV_STAMP)

$(DEV_STAMP): $(STAMP)
	@echo "installing test and tooling packages into $(VENV)"
	$(PY) -m pip install --quiet --progress-bar off -r requirements-dev.txt -c requirements-lock.txt \
		-c requirements-dev-lock.txt
	@rm -f $(VENV)/.installed-dev-*; touch $@

# Chromium (browser tests, PNG export) and the full Fashion-MNIST. Optional: without them the
# browser tests skip and the bundled subset is used. STRUCTGUARD_SKIP_APT=1 skips this step.
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -z "$$missing" ] || [ -n "$$STRUCTGUARD_SKIP_APT" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian packages:$$missing"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q --no-install-recommends $$missing </dev/null \
		|| { apt-get update -q </dev/null && apt-get install -y -q --no-install-recommends $$missing </dev/null; } \
		|| echo "warning: apt-get could not install$$missing; continuing without them (bundled data is used)"; \
	else \
		echo "note: skipping Debian packages$$missing (installing them needs root and apt-get)."; \
		echo "      Browser tests will be skipped; the bundled Fashion-MNIST subset in assets/data/ works without them."; \
		echo "      To add them: sudo apt-get install$$missing"; \
	fi

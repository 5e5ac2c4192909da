# verlyard: make demo | make test | make up | make bench | make soak | make lint
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install test unit integration e2e browser lint up demo bench soak clean trainer-env

$(STAMP): shared/pyproject.toml services/*/pyproject.toml requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e 'shared[embedded]' -e services/api -e services/scheduler -e services/gpu-agent -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP)

# The trainer's Python (verl 0.9.1 + CPU torch 2.13.0) in .trainer-venv: idempotent, minutes on first build.
# The agent runs it as VERLYARD_TRAINER_PYTHON; the training tests use it (and skip if it cannot be built).
trainer-env:
	scripts/trainer-env.sh >/dev/null
TRAINER_ENV_OR_SKIP := scripts/trainer-env.sh >/dev/null || echo "trainer env unavailable: the verl tests will skip"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/pyright

unit: $(STAMP)
	$(PY) -m pytest tests/unit -q

integration: $(STAMP)
	$(TRAINER_ENV_OR_SKIP)
	$(PY) -m pytest tests/integration -q

e2e: $(STAMP)
	$(PY) -m pytest tests/e2e -q

# The dashboard in headless Debian chromium (scripts/system-deps.sh installs it) against `verlyard up`.
browser: $(STAMP)
	$(PY) -m pytest tests/browser -q

# The full suite needs the real trainer env: a failed build fails `make test` (no silent verl skips in CI).
# The browser tests run in a pytest process of their own: Playwright's sync API keeps an event loop
# running in the main thread for its session, which every asyncio test after it would trip over.
test: $(STAMP)
	scripts/trainer-env.sh >/dev/null
	$(MAKE) lint
	$(PY) -m pytest tests -q --ignore=tests/browser
	$(PY) -m pytest tests/browser -q

up: $(STAMP)
	$(VENV)/bin/verlyard up

# The whole product end to end on this machine (README: how long it takes).
demo: $(STAMP)
	scripts/trainer-env.sh >/dev/null
	$(PY) scripts/demo.py

bench: $(STAMP)
	scripts/trainer-env.sh >/dev/null
	scripts/system-deps.sh || echo "wrk unavailable: H1 falls back to a Python load client"
	$(PY) -m bench

# Fault injection (docs/reliability.md): T1 T2 T6 T7 T8 T14 T15, each on its own throwaway stack, one at a
# time; a Jepsen-style summary each, results in soak/results/<scenario>.json; non-zero on any loss or
# duplicate. `make soak SOAK_ARGS="--scenario T1 --quick"` for one.
soak: $(STAMP)
	$(PY) -m soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

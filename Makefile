# The two commands of the README. Each creates the virtual environment if it is missing,
# installs the project into it, and runs: `make demo` the pipeline, `make test` the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export POSTERFUSION_HOME ?= $(CURDIR)/.state
# The real COCO detector and the pretrained MobileNetV2 beside the checkout, when there (no network needed).
DETECTOR ?= $(wildcard ../shared/weights/yolov8n_int8.tflite)
export POSTERFUSION_WEIGHTS ?= $(abspath ../shared/weights)
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: demo test test-fast install browser lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall only when the dependency list changes. pip would byte-compile the packages one file after
# another; compileall does it on every core (measured on 2 cores: 61 s → 35 s). Without .pyc files each
# process recompiles what it imports (PYTHONDONTWRITEBYTECODE is often set). The one file skipped is
# torch's Python 3.12 syntax test helper, which no 3.11 interpreter compiles (pip skips it silently).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --no-compile -e ".[dev]"
	$(BIN)/python -m compileall -q -j 0 -x 'torch/testing/_internal/py312_intrinsics\.py' $(VENV)/lib
	touch $@

install: $(VENV)/.installed

# The browser test drives Debian's chromium (never a downloaded browser); installed once per machine.
CHROMIUM ?= /usr/bin/chromium
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
$(CHROMIUM):
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium

browser: $(CHROMIUM)

demo: install
	$(BIN)/posterfusion demo $(if $(DETECTOR),--detector $(DETECTOR)) $(DEMO_ARGS)

test: install browser
	$(BIN)/ruff check .
	$(BIN)/python -P -m pytest $(PYTEST_ARGS)

# Unit tests only (no real data, no multi-node cluster): the quick loop while coding.
test-fast: install
	$(BIN)/python -P -m pytest -m "not slow and not cluster" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf runs .state .pytest_cache

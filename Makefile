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
# Python keeps the .pyc files it compiles (see the install rule): a machine that sets this would have
# every process recompile torch and Ray from source.
unexport PYTHONDONTWRITEBYTECODE
PYTEST_ARGS ?=

.PHONY: demo test test-fast install browser lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall only when the dependency list changes. pip does not byte-compile (--no-compile): its
# compile of every installed file took 61 s here, while Python compiles a module on its first import
# and keeps the .pyc (PYTHONDONTWRITEBYTECODE is unset above): the jobs' first import of torch, Ray,
# Ultralytics, MLflow and the rest took 24 s instead of 10 s, once (measured on this machine).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --no-compile -e ".[dev]"
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

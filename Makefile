# Two commands on a fresh machine (Python 3.10+):
#   make demo   # virtualenv + install + the default end-to-end run -> results/default/
#   make test   # virtualenv + install + the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
export RAY_AUTH_MODE ?= disabled
export HF_HUB_OFFLINE ?= 1

.PHONY: setup compile demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

# Byte-compile the package once: every Ray worker imports it, and with PYTHONDONTWRITEBYTECODE
# set (as on CI machines) each would otherwise compile it again.
compile: setup
	$(BIN)/python -m compileall -q synthaug

demo: compile
	$(BIN)/synthaug run --config jobs/configs/default.yaml

# Two pytest-xdist workers, a test file each at a time (module fixtures stay in one process),
# the longest files first (tests/conftest.py); each worker starts its own local Ray, S3 server
# and MLflow server on free ports.
test: compile
	$(BIN)/python -m pytest tests -n 2 --dist loadfile --no-loadscope-reorder --durations=25

bench: setup
	$(BIN)/python benchmarks/finetune_throughput.py
	$(BIN)/python benchmarks/sample_throughput.py
	$(BIN)/python benchmarks/classifier_throughput.py

clean:
	rm -rf runs $(VENV)

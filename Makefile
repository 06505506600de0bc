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

# The ray-job-submit tests start their own Ray nodes from the CLI, so they run after the in-process suite.
test: compile
	$(BIN)/python -m pytest tests --ignore=tests/test_jobs.py --ignore=tests/test_multinode.py --durations=25
	$(BIN)/python -m pytest tests/test_jobs.py tests/test_multinode.py --durations=10

bench: setup
	$(BIN)/python benchmarks/finetune_throughput.py
	$(BIN)/python benchmarks/sample_throughput.py
	$(BIN)/python benchmarks/classifier_throughput.py

clean:
	rm -rf runs $(VENV)

# make demo: the whole workflow on the embedded default.  make test: the test suite (make test-fast: its
# quick part, minutes).  make up: the embedded default served (Airflow UI, MLflow, S3 on 127.0.0.1) until Ctrl-C.
# Both create .venv on first use; everything runs offline.
VENV   := .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: venv demo up test test-fast lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	# The CPU wheel first, so no dependency pulls the CUDA build.
	$(PYTHON) -m pip install --quiet "torch==2.13.0"
	$(PYTHON) -m pip install --quiet -e ".[airflow,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/detox demo

# Ports: DETOX_AIRFLOW_PORT (8080), DETOX_MLFLOW_PORT (5000). `exec` so that Ctrl-C and SIGTERM
# reach the stack's own process, which stops everything it started.
up: $(STAMP)
	exec $(VENV)/bin/detox up

# PYTEST_ARGS: extra pytest options, e.g. make test PYTEST_ARGS="--durations=25 -x".
# PYTEST_WORKERS: pytest-xdist processes (0: none). Whole modules go to one worker (tests/conftest.py
# groups them), in the order conftest.py gives, hence --no-loadscope-reorder.
PYTEST_WORKERS ?= 2
XDIST := -n $(PYTEST_WORKERS) --dist loadgroup --no-loadscope-reorder
test: $(STAMP)
	$(PYTHON) -m pytest $(XDIST) $(PYTEST_ARGS)

# The edit loop: no embedded build, no DAG runs; tiny models made from a config only.
test-fast: $(STAMP)
	$(PYTHON) -m pytest $(XDIST) -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf .detox

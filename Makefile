# One-command entry points. Each target installs what it needs first (idempotent).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
GRID ?= strategies.yaml
PYTEST_FAST := $(PY) -m pytest -m "not slow" --nbval tests notebooks
PYTEST_SLOW := $(PY) -m pytest -m slow tests

.PHONY: setup data run test test-slow lint lab ui bench bench-scale

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (seaforest)" >/dev/null
	@touch $(STAMP)
	@echo "environment ready: $(VENV)"

data: $(STAMP)
	@$(VENV)/bin/dvc pull --quiet && echo "data ready: data/ (version $$(grep -m1 md5 data.dvc | awk '{print $$3}'))"

setup: $(STAMP) data

run: setup
	$(PY) run_experiments.py --grid $(GRID)

test: setup
	$(PYTEST_FAST)

test-slow: setup
	$(PYTEST_SLOW)

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

lab: setup
	$(VENV)/bin/jupyter lab --ip 127.0.0.1 notebooks/

ui: $(STAMP)
	@echo "MLflow UI: http://127.0.0.1:5000/#/experiments?workflowType=machine_learning (the model-training view)"
	$(VENV)/bin/mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///$(CURDIR)/mlflow.db

bench: setup
	$(PY) benchmarks/run_benchmarks.py $(BENCH_ARGS)

bench-scale: setup
	$(PY) benchmarks/bench_scale.py $(SCALE_ARGS)

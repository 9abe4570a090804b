# Esper developer entry points. Every target sets up .venv itself on first use.
VENV        ?= .venv
PYTHON      ?= python3
TORCH_SPEC  ?= torch==2.13.0
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.esper-installed
PYTEST_ARGS ?=
DOCKERFILES := $(shell find . -path ./.venv -prune -o -name 'Dockerfile*' -type f -print)

.PHONY: demo test test-fast lint crds bench mutation clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

## demo: compile the example Blueprints into a local store and grow a model with them
demo: $(STAMP)
	$(VENV)/bin/esper demo

## test: lint, then the whole suite (unit, compiler round trips, emulated cluster; the real_api tests and
## the operator and sidecar tests on the real API server where one is found); what CI runs
test: lint
	$(PY) -m esper.contracts.crd --check
	$(PY) -m pytest -ra --durations=15 --cov --cov-report= $(PYTEST_ARGS)

## test-fast: everything but the AOTInductor compiles
test-fast: $(STAMP)
	$(PY) -m pytest -ra -m "not slow" $(PYTEST_ARGS)

## lint: ruff; hadolint on every Dockerfile; actionlint on .github/workflows (with shellcheck if on PATH)
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/lint-imports
	$(PY) -m mypy
	$(VENV)/bin/hadolint $(DOCKERFILES)
	$(VENV)/bin/actionlint

## crds: regenerate crds/ and the chart's copy from the pydantic models
crds: $(STAMP)
	$(PY) -m esper.contracts.crd

bench: $(STAMP)
	$(PY) benchmarks/compile.py
	$(PY) benchmarks/compile_floor.py
	$(PY) benchmarks/operator.py
	$(PY) benchmarks/kasmina.py

## mutation: mutmut over the core modules with the fast tests, one module at a time (slow: tens of minutes)
MUTATION_MODULES ?=
mutation: $(STAMP)
	nice -n 19 $(PY) benchmarks/mutation.py $(MUTATION_MODULES)

clean:
	rm -rf .esper benchmarks/results .pytest_cache

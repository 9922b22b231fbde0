# megatron-syne: `make demo` runs the whole pipeline on the embedded corpus; `make test` runs the suite.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test demo lint format clean readme

setup: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -r requirements.txt
	$(VENV)/bin/pip install --no-deps -r requirements-nodeps.txt
	$(VENV)/bin/pip install --no-deps --no-build-isolation -e .
	touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: setup lint
	$(PY) -m pytest -q tests

demo: setup
	$(PY) examples/quickstart/run_demo.py --output-dir demo_output

readme: setup
	$(PY) docs/build_readme.py

clean:
	rm -rf demo_output .pytest_cache

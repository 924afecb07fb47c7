# The two commands of the README: `make demo` (the example campaign end to end) and `make test`.
VENV ?= .venv
PYTHON ?= python3
AIRFLOW_VERSION ?= 3.3.2
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(AIRFLOW_VERSION)
# The versions the tests ran with, for this Airflow and Python (constraints/); none: pip resolves afresh.
PYTHON_VERSION := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
CONSTRAINTS_FILE := constraints/airflow-$(AIRFLOW_VERSION)-python-$(PYTHON_VERSION).txt
CONSTRAINTS ?= $(wildcard $(CONSTRAINTS_FILE))

.PHONY: install demo test lint bench clean constraints

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "apache-airflow==$(AIRFLOW_VERSION)" -e ".[dev]" $(if $(CONSTRAINTS),--constraint $(CONSTRAINTS))
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m devtools.demo --dags-folder dags_examples

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: install
	$(PY) bench/run.py

# Pin what .venv holds now as the constraints of this Airflow and Python (after changing a dependency).
constraints: install
	mkdir -p constraints
	{ echo "# The versions this repository's tests ran with: apache-airflow $(AIRFLOW_VERSION) on Python $(PYTHON_VERSION), every extra of"; \
	  echo "# airflow-provider-pepipost installed (make install). A pip constraints file: it pins what gets"; \
	  echo "# installed and installs nothing by itself; see README \"Install\". Regenerate with make constraints."; \
	  $(PY) -m pip freeze --exclude-editable; } > $(CONSTRAINTS_FILE).new
	mv $(CONSTRAINTS_FILE).new $(CONSTRAINTS_FILE)

clean:
	rm -rf .demo bench/results .pytest_cache

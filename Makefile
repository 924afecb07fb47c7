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

# The older Airflow lines the provider claims, at their latest patches: `make test-lines` runs the
# unit, DAG and fault tiers on each, in its own virtualenv (.venv-<version>), installed as above;
# the fault modules that run on both send transports run there on the default one (the main line
# runs both: the transports are the provider's own code, not Airflow's).
AIRFLOW_LINES ?= 3.1.8 3.2.2

.PHONY: install demo test test-lines test-tiers lint bench clean constraints docs

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

test-lines:
	@for version in $(AIRFLOW_LINES); do \
	  echo "== Airflow $$version: unit, DAG and fault tests (.venv-$$version)"; \
	  PEPIPOST_TEST_TRANSPORTS=event_loop $(MAKE) --no-print-directory test-tiers VENV=.venv-$$version \
	    AIRFLOW_VERSION=$$version || exit 1; \
	done

# Every test but the system tests (which run on the main line only), in $(VENV).
test-tiers: install
	$(PY) -m pytest -m "not system"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: install
	$(PY) bench/run.py

# The documentation site, docs/_build/html/index.html: warnings are errors, references are checked
# (tests/unit/test_docs.py runs this recipe's options, and breaks the docs on purpose).
docs: install
	$(PY) -m sphinx -W --keep-going -n -b html docs docs/_build/html

# Pin what .venv holds now as the constraints of this Airflow and Python (after changing a dependency).
constraints: install
	mkdir -p constraints
	{ echo "# The versions this repository's tests ran with: apache-airflow $(AIRFLOW_VERSION) on Python $(PYTHON_VERSION), every extra of"; \
	  echo "# airflow-provider-pepipost installed (make install). A pip constraints file: it pins what gets"; \
	  echo "# installed and installs nothing by itself; see docs/install.md. Regenerate with make constraints."; \
	  $(PY) -m pip freeze --exclude-editable; } > $(CONSTRAINTS_FILE).new
	mv $(CONSTRAINTS_FILE).new $(CONSTRAINTS_FILE)

clean:
	rm -rf .demo bench/results .pytest_cache

"""Sphinx configuration of the documentation site (`make docs`): pages in Markdown (MyST), the API
reference by autodoc, code examples included from the tested example DAGs.

Warnings are errors (`-W` in the Makefile), and references are checked (`nitpicky`): a link to a
page or an anchor that does not exist, an autodoc of an object that is gone, or an example file or
marker that is gone fails the build. tests/unit/test_docs.py breaks each on purpose.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
REPO = DOCS.parent

# autodoc documents the package beside these pages (in a checkout that is not installed too).
sys.path.insert(0, str(REPO))
# Importing the package imports Airflow, which writes a default airflow.cfg into AIRFLOW_HOME:
# keep that out of ~/airflow when the build runs without one.
os.environ.setdefault("AIRFLOW_HOME", str(DOCS / "_build" / "airflow-home"))

import airflow_provider_pepipost  # noqa: E402

project = "airflow-provider-pepipost"
author = "airflow-provider-pepipost contributors"
copyright = "2026, airflow-provider-pepipost contributors"
release = version = airflow_provider_pepipost.__version__

extensions = ["myst_parser", "sphinx.ext.autodoc"]
source_suffix = {".md": "markdown"}
# docs/pepipost/ holds the vendor's pages and the facts restated from them, written for whoever
# changes the provider ("build for both readings"); one is a copy of the vendor's page. They stay
# in the repository, out of the site: users read what the provider does with them.
# docs/examples/ holds the DAG files the pages include (tests/dags/test_docs_examples.py runs them).
exclude_patterns = ["_build", "pepipost", "examples"]

# [text](page.md#a-heading) links need the headings' anchors; three levels, as the pages use.
myst_heading_anchors = 3

autodoc_member_order = "bysource"
# Types go with the parameters, not in the signature: a dataclass's signature shows its factory
# defaults as `<factory>`, which Sphinx cannot parse, and then splits `dict[str, int]` at the comma.
autodoc_typehints = "description"

# No network in CI but the package registries: no intersphinx. References to objects outside this
# package cannot resolve, so they are let go by the name of their package, and only those: a
# reference to an object of ours, or to a name without a package, still fails.
nitpicky = True
_EXTERNAL_PACKAGES = (
    # what the public names' signatures name, or may: Airflow, the libraries the provider is
    # built on, and the standard library's modules of types
    "airflow",
    "requests",
    "sqlalchemy",
    "fastapi",
    "starlette",
    "pendulum",
    "collections",
    "datetime",
    "pathlib",
    "typing",
)
nitpick_ignore_regex = [(r"py:.*", rf"({'|'.join(_EXTERNAL_PACKAGES)})\..+")]
# Airflow wraps an operator's __init__, so autodoc shows its annotations as written: airflow.sdk's
# Asset appears bare. That one name, and no other bare name, is let go too.
nitpick_ignore = [("py:class", "Asset")]

html_theme = "furo"
html_title = f"{project} {release}"

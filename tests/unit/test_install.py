"""What an install brings: the constraints file in the repository, and the extras' providers."""

from __future__ import annotations

import re
import sys
from importlib.metadata import PackageNotFoundError, distributions, requires, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
AIRFLOW_VERSION = version("apache-airflow")  # the installed one: each Airflow line has its own file
CONSTRAINTS = REPO / "constraints" / f"airflow-{AIRFLOW_VERSION}-python-{sys.version_info[0]}.{sys.version_info[1]}.txt"


def pins() -> dict[str, str]:
    if not CONSTRAINTS.exists():
        pytest.skip(f"no constraints file for Python {sys.version_info[0]}.{sys.version_info[1]} ({CONSTRAINTS.name})")
    lines = [line.strip() for line in CONSTRAINTS.read_text().splitlines()]
    pinned = [re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line) for line in lines if line and not line.startswith("#")]
    assert all(pinned), [line for line, match in zip(lines, pinned, strict=False) if not match]
    return {canonicalize_name(match[1]): match[2] for match in pinned}


def test_the_constraints_pin_every_requirement_of_every_extra():
    """An install from the file (offline, from a folder of wheels) finds a version for every package."""
    pinned = pins()
    assert pinned["apache-airflow"] == AIRFLOW_VERSION
    wanted = {canonicalize_name(Requirement(r).name) for r in requires("airflow-provider-pepipost") or []}
    wanted -= {"airflow-provider-pepipost"}
    assert wanted and wanted - set(pinned) == set(), "run `make constraints` after changing a dependency"


def test_this_environment_is_what_the_constraints_pin():
    """`make install` installs from the file: the tests run with the versions it names."""
    pinned = pins()
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in distributions()}
    differ = {
        name: (pin, installed[name]) for name, pin in pinned.items() if name in installed and installed[name] != pin
    }
    assert differ == {}, "run `make constraints` after changing a dependency, or `make install` again"


def test_the_postgres_extra_brings_airflows_postgres_provider():
    """Without it the UI offers no Postgres connection type for the status store."""
    extra = [Requirement(r) for r in requires("airflow-provider-pepipost") or [] if 'extra == "postgres"' in r]
    assert "apache-airflow-providers-postgres" in {canonicalize_name(r.name) for r in extra}
    try:
        version("apache-airflow-providers-postgres")
    except PackageNotFoundError:
        pytest.fail("the dev install lacks the [postgres] extra's provider")

"""The package as a user gets it: the sdist and wheel built from this tree, their contents checked,
and the wheel installed into a new virtualenv beside Airflow, where Airflow finds the provider."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import airflow_provider_pepipost

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[2]
AIRFLOW_VERSION = "3.3.2"
CONSTRAINTS = REPO / "constraints" / f"airflow-{AIRFLOW_VERSION}-python-{sys.version_info[0]}.{sys.version_info[1]}.txt"


def run(*command: str | Path, timeout: float = 900) -> str:
    done = subprocess.run([str(part) for part in command], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, command))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(the new virtualenv's python, the wheel, the sdist), built with PyPA's build from this tree."""
    folder = tmp_path_factory.mktemp("package")
    venv = folder / "venv"
    run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    run(python, "-m", "pip", "install", "--quiet", "--upgrade", "pip", "build")
    run(python, "-m", "build", "--outdir", folder / "dist", REPO)
    (wheel,) = (folder / "dist").glob("*.whl")
    (sdist,) = (folder / "dist").glob("*.tar.gz")
    return python, wheel, sdist


def test_the_wheel_holds_the_package_its_types_and_license_and_no_tests(built):
    _, wheel, _ = built
    version = airflow_provider_pepipost.__version__
    assert wheel.name == f"airflow_provider_pepipost-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(f"airflow_provider_pepipost-{version}.dist-info/METADATA").decode()
        entry_points = archive.read(f"airflow_provider_pepipost-{version}.dist-info/entry_points.txt").decode()
    assert "airflow_provider_pepipost/py.typed" in names
    assert "airflow_provider_pepipost/triggers/replies.py" in names
    assert not [name for name in names if name.startswith(("tests/", "bench/", "dags_examples/", "devtools/"))]
    dist_info = f"airflow_provider_pepipost-{version}.dist-info"
    assert f"{dist_info}/licenses/LICENSE" in names
    assert f"Version: {version}" in metadata and "License-Expression: Apache-2.0" in metadata
    assert "Requires-Dist: apache-airflow>=3.1" in metadata
    assert "provider_info = airflow_provider_pepipost:get_provider_info" in entry_points
    assert "pepipost-webhook = airflow_provider_pepipost.webhook.cli:main" in entry_points


def test_the_sdist_builds_the_same_version_and_carries_the_license(built):
    _, _, sdist = built
    version = airflow_provider_pepipost.__version__
    with tarfile.open(sdist) as archive:
        names = archive.getnames()
    assert f"airflow_provider_pepipost-{version}/LICENSE" in names
    assert f"airflow_provider_pepipost-{version}/airflow_provider_pepipost/py.typed" in names


def test_the_wheel_installed_beside_airflow_is_a_provider_airflow_finds(built, tmp_path):
    python, wheel, _ = built
    constraint = ["--constraint", CONSTRAINTS] if CONSTRAINTS.exists() else []
    run(python, "-m", "pip", "install", "--quiet", f"apache-airflow=={AIRFLOW_VERSION}", wheel, *constraint)
    home = tmp_path / "airflow"
    listed = subprocess.run(
        [str(python.parent / "airflow"), "providers", "list", "--output", "json"],
        capture_output=True, text=True, timeout=300, env={"AIRFLOW_HOME": str(home), "PATH": str(python.parent)},
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert '"package_name": "airflow-provider-pepipost"' in listed.stdout, listed.stdout[-2000:]
    assert airflow_provider_pepipost.__version__ in listed.stdout
    scripts = run(python, "-c", "from importlib.metadata import entry_points; "
                                "print(sorted(e.name for e in entry_points(group='console_scripts')))")  # fmt: skip
    assert all(name in scripts for name in ("pepipost-webhook", "pepipost-sandbox", "pepipost-store"))

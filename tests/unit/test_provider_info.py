"""Provider metadata: what Airflow discovers after `pip install`, and the connection form it shows."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from airflow_provider_pepipost import get_provider_info
from airflow_provider_pepipost.connection_form import EXTRA_FIELDS
from airflow_provider_pepipost.version_compat import AIRFLOW_V_3_2_PLUS


def test_the_entry_point_points_at_get_provider_info():
    (found,) = [
        ep for ep in entry_points(group="apache_airflow_provider") if ep.value.startswith("airflow_provider_pepipost")
    ]
    assert found.load() is get_provider_info


def test_provider_info_matches_airflows_schema_and_every_class_imports():
    import airflow
    import jsonschema

    schema = json.loads((Path(airflow.__file__).parent / "provider_info.schema.json").read_text())
    info = get_provider_info()
    jsonschema.validate(info, schema)
    (conn,) = info["connection-types"]
    assert conn["connection-type"] == "pepipost"
    for dotted in [conn["hook-class-name"], info["plugins"][0]["plugin-class"], *info["notifications"]]:
        module, _, name = dotted.rpartition(".")
        assert getattr(importlib.import_module(module), name)
    for section in ("hooks", "operators", "sensors", "triggers"):
        for module in info[section][0]["python-modules"]:
            importlib.import_module(module)
    assert set(conn["conn-fields"]) == set(EXTRA_FIELDS)
    assert conn["ui-field-behaviour"]["relabeling"] == {"host": "Base URL", "password": "API key"}


def test_airflow_lists_the_provider_and_finds_its_hook():
    from airflow.providers_manager import ProvidersManager

    manager = ProvidersManager()
    assert "airflow-provider-pepipost" in manager.providers
    if AIRFLOW_V_3_2_PLUS:  # where tasks look hooks up (Connection.get_hook): the Task SDK's own manager
        from airflow.sdk.providers_manager_runtime import ProvidersManagerTaskRuntime

        hook = ProvidersManagerTaskRuntime().hooks["pepipost"]
    else:  # Airflow 3.1: the ProvidersManager
        hook = manager.hooks["pepipost"]
    assert hook.hook_class_name == "airflow_provider_pepipost.hooks.pepipost.PepipostHook"


@pytest.mark.skipif(
    not AIRFLOW_V_3_2_PLUS,
    reason="Airflow 3.1 reads the form from the hook's methods, and only in the api-server (which mocks FAB): "
    "tests/dags/test_connection_ui.py checks it there",
)
def test_airflow_reads_the_connection_form_from_the_provider_info():
    from airflow.providers_manager import ProvidersManager

    manager = ProvidersManager()
    assert "extra__pepipost__source" in manager.connection_form_widgets
    assert manager.field_behaviours["pepipost"]["hidden_fields"] == ["schema", "login", "extra"]  # the port shows


@pytest.mark.dag
def test_airflow_providers_list_shows_it(airflow_db):
    out = subprocess.run(
        [str(Path(sys.executable).parent / "airflow"), "providers", "list", "--output", "json"],
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ),
    ).stdout
    start = out.index("[")
    packages = {p["package_name"] for p in json.loads(out[start:])}
    assert "airflow-provider-pepipost" in packages

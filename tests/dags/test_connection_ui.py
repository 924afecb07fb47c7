"""The connections a user makes in the UI, through a real `airflow api-server`: the Pepipost form, its Test
button, and the store's PostgreSQL connection type.

The UI's Test button (connection list, Airflow 3.3.2) posts the stored connection as it lists it:
the masked password and ``Number(port)``, so 0 for a connection without a port. These tests post
exactly that body.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from airflow_provider_pepipost.sandbox import DEFAULT_API_KEY, DEFAULT_SOURCE
from airflow_provider_pepipost.version_compat import AIRFLOW_V_3_3_PLUS
from tests.helpers import free_port, http_ok, wait_until

pytestmark = pytest.mark.dag
PASSWORD = "admin-pw-5e2"


@pytest.fixture(scope="module")
def api(airflow_db, tmp_path_factory) -> Iterator[tuple[str, dict[str, str]]]:
    """An api-server with [core] test_connection enabled; (base URL, an admin's auth header)."""
    folder = tmp_path_factory.mktemp("connection-ui")
    passwords = folder / "passwords.json"
    passwords.write_text(json.dumps({"admin": PASSWORD}))
    port = free_port()
    env = {
        **os.environ,
        "AIRFLOW__CORE__TEST_CONNECTION": "Enabled",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
    }
    log = folder / "api-server.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [str(Path(sys.executable).parent / "airflow"), "api-server", "--port", str(port), "--host", "127.0.0.1"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: http_ok(f"{base}/api/v2/monitor/health"), timeout=120), log.read_text()[-3000:]
        answer = requests.post(f"{base}/auth/token", json={"username": "admin", "password": PASSWORD}, timeout=10)
        assert answer.status_code == 201, answer.text
        yield base, {"Authorization": f"Bearer {answer.json()['access_token']}"}
    finally:
        server.terminate()
        server.wait(timeout=30)


def save_connection(api: tuple[str, dict[str, str]], conn_id: str, **fields: object) -> None:
    """What the UI's "Add connection" form posts."""
    base, auth = api
    requests.delete(f"{base}/api/v2/connections/{conn_id}", headers=auth, timeout=10)
    body = {"connection_id": conn_id, "conn_type": "pepipost", **fields}
    answer = requests.post(f"{base}/api/v2/connections", json=body, headers=auth, timeout=10)
    assert answer.status_code == 201, answer.text


def press_test(api: tuple[str, dict[str, str]], conn_id: str) -> requests.Response:
    """The Test button of the connection list: the listed connection, reposted as the UI does."""
    base, auth = api
    listed = requests.get(f"{base}/api/v2/connections/{conn_id}", headers=auth, timeout=10).json()
    body = {
        "conn_type": listed["conn_type"],
        "connection_id": listed["connection_id"],
        "description": listed["description"] or "",
        "extra": listed["extra"] or "{}",
        "host": listed["host"] or "",
        "login": listed["login"] or "",
        "password": listed["password"] or "",
        "port": listed["port"] or 0,  # Number(null) is 0 in the UI
        "schema": listed["schema"] or "",
    }
    return requests.post(f"{base}/api/v2/connections/test", json=body, headers=auth, timeout=30)


def test_the_pepipost_form_shows_the_port_and_its_test_button_works(api, sandbox):
    base, auth = api
    meta = requests.get(f"{base}/ui/connections/hook_meta", headers=auth, timeout=30).json()
    (form,) = [m for m in meta if m["connection_type"] == "pepipost"]
    hidden = {name for name, field in form["standard_fields"].items() if field and field.get("hidden")}
    assert "port" not in hidden and {"login", "url_schema"} <= hidden
    assert "Test button" in form["standard_fields"]["port"]["placeholder"]

    # As the form asks: the base URL, its port, the key, the source.
    address = urlsplit(sandbox.url)
    extra = json.dumps({"source": DEFAULT_SOURCE})
    fields = {"host": f"http://{address.hostname}", "password": DEFAULT_API_KEY, "extra": extra}
    save_connection(api, "pepipost_ui_test", **fields, port=address.port)
    answer = press_test(api, "pepipost_ui_test")
    assert answer.status_code == 200, answer.text
    assert answer.json() == {
        "status": True,
        "message": f"Connection test passed: {sandbox.url} answered and took the API key. Nothing was sent.",
    }
    assert sandbox.state.accepted_count == 0

    # Without the port (the base URL holding it, as the form hid it before), Airflow 3.3 refuses the
    # test before the hook runs: what the README says to avoid. 3.1 and 3.2 have no such check: they
    # test the stored connection with the posted port 0, which the hook reads as no port.
    save_connection(api, "pepipost_ui_no_port", **{**fields, "host": sandbox.url})
    answer = press_test(api, "pepipost_ui_no_port")
    if AIRFLOW_V_3_3_PLUS:
        assert answer.status_code == 400 and "The host or port to test differs" in answer.text
        assert sandbox.state.requests == 1  # only the first test reached the sandbox
    else:
        assert answer.status_code == 200 and answer.json()["status"] is True, answer.text
        assert sandbox.state.requests == 2 and sandbox.state.accepted_count == 0


def test_the_ui_offers_a_postgres_connection_for_the_status_store(api):
    """The [postgres] extra brings Airflow's postgres provider: the UI lists the connection type."""
    base, auth = api
    meta = requests.get(f"{base}/ui/connections/hook_meta", headers=auth, timeout=30).json()
    assert "postgres" in {m["connection_type"] for m in meta}

"""The receiver mounted by the provider's plugin inside a real `airflow api-server`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from airflow_provider_pepipost.status.store import StatusStore
from tests.helpers import free_port, http_ok, wait_until
from tests.store_reads import current_status

pytestmark = pytest.mark.dag


def test_the_api_server_mounts_the_receiver_with_its_own_token(airflow_db, sqlite_url):
    port = free_port()
    env = dict(os.environ, PEPIPOST_WEBHOOK_TOKEN="api-server-token", PEPIPOST_STATUS_STORE_URL=sqlite_url)
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "airflow"), "api-server", "--port", str(port), "--host", "127.0.0.1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}/pepipost"

    try:
        assert wait_until(lambda: http_ok(f"{base}/healthz"), timeout=90, interval=0.5), "the API server is not up"
        body = {"delivery_status": [{"ncmessage_id": "m-api", "status": "delivered", "received_at": "1700000000"}]}
        assert (
            requests.post(f"{base}/webhook", json=body, timeout=10).status_code == 401
        )  # Airflow's auth does not apply
        answer = requests.post(
            f"{base}/webhook", json=body, headers={"X-Pepipost-Token": "api-server-token"}, timeout=10
        )
        assert answer.status_code == 200 and answer.json()["accepted"] == 1
        assert current_status(StatusStore(sqlite_url), "m-api") == "delivered"
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()

"""The sandbox checks requests as the vendor does, and posts delivery reports as the vendor does."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests
from fastapi import FastAPI, Request

from airflow_provider_pepipost.sandbox import DEFAULT_API_KEY, SandboxServer, Scenario
from tests.helpers import ServedApp, wait_until

AUTH = {"Authorization": f"Bearer {DEFAULT_API_KEY}"}


def media(**overrides) -> dict:
    item = {
        "recipient_whatsapp": "919833078369",
        "message_type": "media",
        "recipient_type": "individual",
        "source": "sandbox-source",
        "x-apiheader": "h1",
        "type_media": [{"attachments": [{"attachment_id": "m-1", "caption": "c"}]}],
    }
    item.update(overrides)
    return {k: v for k, v in item.items() if v is not None}


def send(sandbox: SandboxServer, body, headers=AUTH) -> requests.Response:
    return requests.post(f"{sandbox.url}/api/v2/message/", json=body, headers=headers, timeout=10)


def test_accepts_the_vendor_example_and_answers_with_an_id(sandbox):
    answer = send(sandbox, {"message": [media()]})
    assert answer.status_code == 200
    assert answer.json()["status"] == "success" and answer.json()["data"]["id"]


@pytest.mark.parametrize(
    ("headers", "status"),
    [({}, 403), ({"Authorization": DEFAULT_API_KEY}, 403), ({"Authorization": "Bearer wrong"}, 401)],
)
def test_auth(sandbox, headers, status):
    answer = send(sandbox, {"message": [media()]}, headers)
    assert answer.status_code == status and answer.json()["error"]["code"] == "8004"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"message": [media(recipient_whatsapp=None)]}, "8001"),
        ({"message": [media(source=None)]}, "8001"),
        ({"message": [media(message_type="text")]}, "8006"),
        ({"message": [media(recipient_whatsapp="12345")]}, "8006"),
        ({"message": [media(recipient_type="channel")]}, "8006"),
        ({"message": [media(source="other")]}, "8006"),
        ({"message": [media(type_media=None)]}, "8001"),
        ({"message": [media(type_media=[{"attachments": [{"caption": "c"}]}])]}, "8001"),
        (
            {
                "message": [
                    media(type_media=[{"attachments": [{"attachment_url": "https://x", "attachment_type": "gif"}]}])
                ]
            },
            "8006",
        ),
        ({"message": []}, "8001"),
        ({"message": [media(), media()]}, "8006"),
    ],
)
def test_validation_codes(sandbox, body, code):
    answer = send(sandbox, body)
    assert answer.json() == {"status": "failure", "error": {"code": code, "message": answer.json()["error"]["message"]}}
    assert sandbox.state.accepted_count == 0


def test_unknown_media_is_8008():
    with SandboxServer(media_ids={"known"}) as sandbox:
        assert send(sandbox, {"message": [media()]}).json()["error"]["code"] == "8008"


def test_recipient_rejections_are_fixed_by_the_seed():
    scenario = Scenario(seed=3, reject_ratio={"8003": 0.5})
    codes = []
    for _ in range(2):
        with SandboxServer(scenario) as sandbox:
            codes.append(
                [
                    send(sandbox, {"message": [media(recipient_whatsapp=f"91983307{i:04d}")]})
                    .json()
                    .get("error", {})
                    .get("code")
                    for i in range(20)
                ]
            )
    assert codes[0] == codes[1] and "8003" in codes[0] and None in codes[0]


def test_an_audience_meets_the_same_outcomes_whatever_run_sent_it():
    """The x-apiheader holds the run id (and a caption may hold the date): outcomes must not depend on it."""
    scenario = Scenario(seed=5, final_mix={"read": 0.4, "delivered": 0.3, "failed": 0.3}, rate_429=0.3)
    runs = []
    for run in ("manual__2026-01-01T00:00:00", "manual__2026-07-09T12:34:56"):
        with SandboxServer(scenario) as sandbox:
            answers = []
            for i in range(40):
                body = {"message": [media(recipient_whatsapp=f"91983307{i:04d}", **{"x-apiheader": f"{run}-{i}"})]}
                answers.append(send(sandbox, body).status_code)
            finals = [sandbox.state.final_by_id[a["message_id"]] for a in sandbox.state.accepted]
            recipients = [a["body"]["message"][0]["recipient_whatsapp"] for a in sandbox.state.accepted]
            runs.append((answers, dict(zip(recipients, finals, strict=True))))
    assert runs[0] == runs[1]
    answers, finals = runs[0]
    assert 429 in answers and 200 in answers and set(finals.values()) == {"read", "delivered", "failed"}


def test_faults_429_with_retry_after_and_drops():
    with SandboxServer(Scenario(rate_429=1.0, retry_after=1.5)) as sandbox:
        answer = send(sandbox, {"message": [media()]})
        assert answer.status_code == 429 and answer.headers["Retry-After"] == "1.5"
    with SandboxServer(Scenario(rate_drop=1.0)) as sandbox, pytest.raises(requests.ConnectionError):
        send(sandbox, {"message": [media()]})


def test_reports_are_posted_in_batches_with_both_time_forms():
    received: list[dict] = []
    lock = threading.Lock()
    app = FastAPI()

    @app.post("/hook")
    async def hook(request: Request):
        body = await request.json()
        with lock:
            received.append({"body": body, "token": request.headers.get("x-pepipost-token")})
        return {"ok": True}

    with ServedApp(app) as receiver:
        for version in (1, 2):
            scenario = Scenario(final_mix={"read": 1.0}, status_delay=0.05, webhook_version=version, inbound_ratio=1.0)
            with SandboxServer(
                scenario, webhook_url=f"{receiver.url}/hook", webhook_headers={"X-Pepipost-Token": "t"}
            ) as sandbox:
                message_id = send(sandbox, {"message": [media(**{"x-apiheader": f"h-v{version}"})]}).json()["data"][
                    "id"
                ]
                assert sandbox.wait_for_reports(10)
            assert wait_until(lambda v=version: sum(1 for r in received if _items_of(r, v)) > 0)
    items = [item for r in received for item in r["body"].get("delivery_status", [])]
    assert {r["token"] for r in received} == {"t"}
    v1 = [i for i in items if "x-apiheader" not in i]
    v2 = [i for i in items if "x-apiheader" in i]
    assert [i["status"] for i in v1] == ["sent", "delivered", "read"]
    assert v1[0]["received_at"].count(":") == 2  # "YYYY-MM-DD HH:MM:SS"
    assert v2[0]["received_at"].isdigit() and v2[0]["x-apiheader"] == "h-v2" and "pricing" in v2[0]
    assert v2[-1]["ncmessage_id"] == message_id
    inbound = [i for r in received for i in r["body"].get("incoming_message", [])]
    assert inbound and inbound[0]["context"]["ncmessage_id"]


def _items_of(record: dict, version: int) -> list:
    items = record["body"].get("delivery_status", [])
    return [i for i in items if ("x-apiheader" in i) == (version == 2)]


def test_scenario_from_json_names_unknown_keys():
    assert Scenario.from_json(json.dumps({"latency": 0.1})).latency == 0.1
    with pytest.raises(ValueError, match="unknown scenario keys"):
        Scenario.from_json('{"latencyy": 1}')


def test_the_final_mix_follows_the_scenario():
    scenario = Scenario(final_mix={"read": 0.5, "failed": 0.5})
    finals = [scenario.final_status(f"id-{i}") for i in range(2000)]
    assert 900 < finals.count("failed") < 1100
    assert set(finals) == {"read", "failed"}


def template(**overrides) -> dict:
    item = {
        "recipient_whatsapp": "919833078369",
        "message_type": "template",
        "source": "sandbox-source",
        "x-apiheader": "t1",
        "type_template": [{"name": "invoice_ready", "attributes": ["Asha", "INV-1"], "language": {"locale": "en"}}],
        "type_media_template": {"type": "document", "url": "https://cdn.example.com/inv.pdf"},
    }
    item.update(overrides)
    return {k: v for k, v in item.items() if v is not None}


def test_accepts_an_approved_template_with_its_header(sandbox):
    answer = send(sandbox, {"message": [template()]})
    assert answer.status_code == 200 and answer.json()["data"]["id"]
    offer = template(**tt(name="spring_offer", attributes=("Asha",)), type_media_template=None)
    assert send(sandbox, {"message": [offer]}).status_code == 200


def tt(name: str = "invoice_ready", attributes: tuple = ("a", "b"), locale: str | None = "en") -> dict:
    """A type_template value."""
    return {"type_template": [{"name": name, "attributes": list(attributes), "language": {"locale": locale}}]}


@pytest.mark.parametrize(
    ("change", "code", "says"),
    [
        (tt(name="nope"), "8006", "approved"),
        (tt(locale="fr"), "8006", "approved"),
        (tt(attributes=("a",)), "8006", "takes 2"),
        (tt(attributes=("a", "")), "8006", "non-empty"),
        (tt(locale=None), "8001", "locale"),
        ({"type_template": None}, "8001", "type_template"),
        ({"type_media_template": None}, "8006", "needs a document header"),
        ({"type_media_template": {"type": "image", "url": "https://x/y.png"}}, "8006", "needs a document header"),
        ({"type_media_template": {"type": "document", "url": "ftp://x/y.pdf"}}, "8008", "media url"),
        ({"ttl": 0}, "8006", "ttl"),
    ],
)
def test_refuses_malformed_templates_as_the_vendor_would(sandbox, change, code, says):
    answer = send(sandbox, {"message": [template(**change)]})
    error = answer.json()["error"]
    assert (error["code"], says in error["message"]) == (code, True), error


def test_a_closed_window_refuses_session_messages_only():
    with SandboxServer(Scenario(closed_window_ratio=1.0)) as sandbox:
        assert send(sandbox, {"message": [media()]}).json()["error"]["code"] == "8007"
        assert send(sandbox, {"message": [template()]}).json()["status"] == "success"
        assert sandbox.state.accepted_by_type == {"template": 1}


SANDBOX_COMMAND = str(Path(sys.executable).parent / "pepipost-sandbox")


def test_the_command_prints_its_address_once_it_listens_there(tmp_path):
    """``--port 0``: the line names the port it got, and that address answers."""
    log = tmp_path / "sandbox.log"
    with log.open("wb") as out:
        process = subprocess.Popen([SANDBOX_COMMAND, "--port", "0"], stdout=out, stderr=subprocess.STDOUT)
    try:
        assert wait_until(lambda: "Pepipost sandbox on" in log.read_text(), timeout=30), log.read_text()
        url = re.search(r"Pepipost sandbox on (http://\S+),", log.read_text()).group(1)
        assert not url.endswith(":0")
        assert requests.get(f"{url}/_sandbox/stats", timeout=10).status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_the_command_says_when_its_port_is_taken():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run([SANDBOX_COMMAND, "--port", str(port)], capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert f"port {port} on 127.0.0.1 is taken" in run.stderr and "--port" in run.stderr
    assert "Pepipost sandbox on" not in run.stdout + run.stderr and "Traceback" not in run.stderr

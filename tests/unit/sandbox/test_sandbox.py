"""The sandbox checks requests as the vendor does, and posts delivery reports as the vendor does."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
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


# -- quick-reply buttons and answers made by hand --------------------------------------------------

SLOT_BUTTONS = [{"text": "Yes, book it", "payload": "YES_BOOK"}, {"text": "Not now", "payload": "NOT_NOW"}]
NUMBER = "919833078369"


class Hook:
    """A webhook receiver on a real loopback port that keeps every body the sandbox posts."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self._lock = threading.Lock()
        app = FastAPI()

        @app.post("/hook")
        async def hook(request: Request):
            body = await request.json()
            with self._lock:
                self.bodies.append(body)
            return {"ok": True}

        self._served = ServedApp(app)
        self.url = f"{self._served.url}/hook"

    def __enter__(self) -> Hook:
        self._served.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._served.__exit__(*exc)

    def incoming(self) -> list[dict]:
        with self._lock:
            return [item for body in self.bodies for item in body.get("incoming_message", [])]

    def taps(self) -> list[dict]:
        return [item for item in self.incoming() if item["message_type"] == "button"]


@pytest.fixture
def hook():
    with Hook() as receiver:
        yield receiver


def posting(hook: Hook, **scenario) -> SandboxServer:
    """A sandbox posting to ``hook``: every message read, fast."""
    settings = {"final_mix": {"read": 1.0}, "status_delay": 0.01, "batch_interval": 0.01, **scenario}
    return SandboxServer(Scenario(**settings), webhook_url=hook.url)


def slot_offer(recipient: str = NUMBER, header: str = "s1") -> dict:
    """A send of the default template with quick-reply buttons: nothing in the body says so."""
    item = template(**tt(name="slot_offer", attributes=("Asha",)), type_media_template=None)
    return {"message": [{**item, "recipient_whatsapp": recipient, "x-apiheader": header}]}


def message_id_of(answer: requests.Response) -> str:
    assert answer.status_code == 200, answer.text
    return answer.json()["data"]["id"]


def by_hand(sandbox: SandboxServer, route: str, body) -> requests.Response:
    return requests.post(f"{sandbox.url}/_sandbox/{route}", json=body, timeout=10)


def test_the_default_scenario_has_a_template_with_quick_reply_buttons(sandbox):
    assert Scenario().templates["slot_offer"] == {
        "locale": "en",
        "attributes": 1,
        "header": None,
        "buttons": SLOT_BUTTONS,
    }
    assert send(sandbox, slot_offer()).json()["status"] == "success"
    assert Scenario().button_tap_ratio == 0.0
    with pytest.raises(ValueError, match=r"templates\.x\.buttons"):
        Scenario(templates={"x": {"locale": "en", "attributes": 0, "header": None, "buttons": [{"text": "A"}]}})


def test_seeded_taps_are_the_same_in_every_run_and_follow_the_ratio(hook):
    scenario = {"seed": 11, "button_tap_ratio": 0.3}
    sc = Scenario(**scenario)
    recipients = [f"91983307{i:04d}" for i in range(200)]
    # What the scenario's own draws say: the tap, and which button, keyed on recipient and kind only.
    expected = {
        r: SLOT_BUTTONS[int(sc.draw("tap-button", sc.draw_key(r, "template")) * 2)]["payload"]
        for r in recipients
        if sc.draw("tap", sc.draw_key(r, "template")) < 0.3
    }
    runs = []
    for run in ("manual__2026-01-01", "scheduled__2026-07-09"):
        hook.bodies.clear()
        with posting(hook, **scenario) as sandbox:
            ids = {r: message_id_of(send(sandbox, slot_offer(r, f"{run}-{r}"))) for r in recipients}
            assert sandbox.wait_for_reports(20)
            assert wait_until(lambda: len(hook.taps()) >= len(expected))
            taps_posted = requests.get(f"{sandbox.url}/_sandbox/stats", timeout=10).json()["taps_posted"]
        taps = hook.taps()
        assert {t["context"]["ncmessage_id"] for t in taps} == {ids[t["from"]] for t in taps}
        runs.append(({t["from"]: t["text_type"]["payload"] for t in taps}, len(taps), taps_posted))
    assert runs[0] == runs[1] == (expected, len(expected), len(expected))
    assert 40 <= len(expected) <= 80  # 30 % of 200, give or take the draw
    assert set(expected.values()) == {"YES_BOOK", "NOT_NOW"}


def test_a_tap_is_posted_after_the_last_status_in_the_vendors_shape(hook):
    with posting(hook, button_tap_ratio=1.0, out_of_order_ratio=1.0) as sandbox:
        before = int(time.time())
        message_id = message_id_of(send(sandbox, slot_offer()))
        assert sandbox.wait_for_reports(10)
        assert wait_until(lambda: hook.taps())
    [tap] = hook.taps()
    button = next(b for b in SLOT_BUTTONS if b["payload"] == tap["text_type"]["payload"])
    assert tap == {
        "message_id": f"in-{message_id}",
        "from": NUMBER,
        "received_at": tap["received_at"],
        "message_type": "button",
        "text_type": {"payload": button["payload"], "text": button["text"]},
        "context": {"ncmessage_id": message_id, "message_id": None},
    }
    assert tap["received_at"].isdigit() and int(tap["received_at"]) >= before
    # Every status of the message was posted in the tap's body or before it.
    order = [kind for body in hook.bodies for kind in ("delivery_status", "incoming_message") if kind in body]
    assert order.index("incoming_message") >= max(i for i, kind in enumerate(order) if kind == "delivery_status")


@pytest.mark.parametrize(
    ("scenario", "answer"),
    [
        ({"button_tap_ratio": 1.0, "stop_reply_ratio": 1.0, "inbound_ratio": 1.0}, ("text", "STOP")),
        ({"button_tap_ratio": 1.0, "inbound_ratio": 1.0}, ("button", None)),
        ({"button_tap_ratio": 0.0, "inbound_ratio": 1.0}, ("text", "Thanks!")),
    ],
)
def test_a_stop_reply_comes_before_a_tap_and_a_tap_before_a_text_reply(hook, scenario, answer):
    with posting(hook, **scenario) as sandbox:
        message_id_of(send(sandbox, slot_offer()))
        assert sandbox.wait_for_reports(10)
        assert wait_until(lambda: hook.incoming())
    [item] = hook.incoming()
    assert (item["message_type"], item["text_type"].get("text") if answer[1] else None) == answer


def test_a_media_or_buttonless_template_recipient_never_taps(hook):
    with posting(hook, button_tap_ratio=1.0) as sandbox:
        for i in range(20):
            message_id_of(send(sandbox, {"message": [media(recipient_whatsapp=f"91983307{i:04d}")]}))
            offer = template(**tt(name="spring_offer", attributes=("Asha",)), type_media_template=None)
            message_id_of(send(sandbox, {"message": [{**offer, "recipient_whatsapp": f"91983307{i:04d}"}]}))
        tapped = message_id_of(send(sandbox, slot_offer("919800000001")))  # the one that can tap
        assert sandbox.wait_for_reports(10)
        assert wait_until(lambda: hook.taps())
        time.sleep(0.1)
        assert requests.get(f"{sandbox.url}/_sandbox/stats", timeout=10).json()["taps_posted"] == 1
    assert [t["context"]["ncmessage_id"] for t in hook.taps()] == [tapped]
    assert hook.incoming() == hook.taps()


def test_a_reply_by_hand_taps_a_button_in_reply_to_the_last_message(hook):
    with posting(hook) as sandbox:
        message_id_of(send(sandbox, {"message": [media()]}))
        last = message_id_of(send(sandbox, slot_offer(header="s2")))
        body = {"from": "+91 98330 78369", "button": {"payload": "YES_BOOK", "text": "Yes"}, "in_reply_to_last": True}
        answer = by_hand(sandbox, "reply", body)
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"queued": 1, "message_id": answer.json()["message_id"], "context_message_id": last}
        text = by_hand(
            sandbox, "reply", {"from": NUMBER, "text": "hi", "context_message_id": "x-1", "in_reply_to_last": True}
        )
        assert text.json()["context_message_id"] == "x-1"  # an explicit id wins
        plain = by_hand(sandbox, "reply", {"from": NUMBER, "text": "hi"})
        assert plain.json()["context_message_id"] is None
        assert wait_until(lambda: len(hook.incoming()) == 3)
        assert requests.get(f"{sandbox.url}/_sandbox/stats", timeout=10).json()["taps_posted"] == 1
    items = {item["message_id"]: item for item in hook.incoming()}
    tap = items[answer.json()["message_id"]]
    assert (tap["from"], tap["message_type"], tap["text_type"]) == (
        "+91 98330 78369",
        "button",
        {"payload": "YES_BOOK", "text": "Yes"},
    )
    assert tap["context"] == {"ncmessage_id": last, "message_id": None}
    assert items[text.json()["message_id"]]["text_type"] == {"text": "hi"}


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"text": "hi"}, "'from'"),
        ({"from": True, "text": "hi"}, "'from'"),
        ({"from": NUMBER}, "'text'"),
        ({"from": NUMBER, "text": "hi", "button": {"payload": "P", "text": "T"}}, "'button'"),
        ({"from": NUMBER, "text": 5}, "'text'"),
        ({"from": NUMBER, "button": "YES_BOOK"}, "'button'"),
        ({"from": NUMBER, "button": {"text": "Yes"}}, "'button.payload'"),
        ({"from": NUMBER, "button": {"payload": "YES_BOOK"}}, "'button.text'"),
        ({"from": NUMBER, "text": "hi", "context_message_id": 5}, "'context_message_id'"),
        ({"from": NUMBER, "text": "hi", "in_reply_to_last": "yes"}, "'in_reply_to_last'"),
        (["not", "an", "object"], "JSON object"),
    ],
)
def test_a_bad_reply_body_is_refused_naming_the_field(hook, body, says):
    with posting(hook) as sandbox:
        answer = by_hand(sandbox, "reply", body)
    assert answer.status_code == 400 and says in answer.json()["detail"], answer.text


def test_in_reply_to_last_without_a_message_for_that_number_is_404(hook):
    with posting(hook) as sandbox:
        message_id_of(send(sandbox, {"message": [media()]}))
        answer = by_hand(sandbox, "reply", {"from": "919800000009", "text": "hi", "in_reply_to_last": True})
    assert answer.status_code == 404 and "919800000009" in answer.json()["detail"]
    assert hook.incoming() == []


def test_a_tap_by_hand_answers_the_last_template_with_buttons(hook):
    with posting(hook) as sandbox:
        offer = message_id_of(send(sandbox, slot_offer()))
        message_id_of(send(sandbox, {"message": [media()]}))  # the last message, but it has no buttons
        answer = by_hand(sandbox, "tap", {"from": "0091 98330 78369", "payload": "NOT_NOW"})
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"queued": 1, "message_id": answer.json()["message_id"], "context_message_id": offer}
        assert wait_until(lambda: hook.taps())
        assert requests.get(f"{sandbox.url}/_sandbox/stats", timeout=10).json()["taps_posted"] == 1
    [tap] = hook.taps()
    assert tap["message_id"] == answer.json()["message_id"]
    assert (tap["text_type"], tap["context"]["ncmessage_id"]) == ({"payload": "NOT_NOW", "text": "Not now"}, offer)


def test_a_tap_by_hand_on_no_such_button_or_template_is_refused(hook):
    with posting(hook) as sandbox:
        message_id_of(send(sandbox, slot_offer()))
        offer = template(**tt(name="spring_offer", attributes=("Asha",)), type_media_template=None)
        message_id_of(send(sandbox, {"message": [{**offer, "recipient_whatsapp": "919800000002"}]}))
        unknown = by_hand(sandbox, "tap", {"from": NUMBER, "payload": "MAYBE"})
        no_template = by_hand(sandbox, "tap", {"from": "919800000002", "payload": "YES_BOOK"})
        no_payload = by_hand(sandbox, "tap", {"from": NUMBER})
        stats = requests.get(f"{sandbox.url}/_sandbox/stats", timeout=10).json()
    assert unknown.status_code == 400 and "'MAYBE'" in unknown.json()["detail"]
    assert "YES_BOOK" in unknown.json()["detail"] and "slot_offer" in unknown.json()["detail"]
    assert no_template.status_code == 404 and "919800000002" in no_template.json()["detail"]
    assert no_payload.status_code == 400 and "'payload'" in no_payload.json()["detail"]
    assert stats["taps_posted"] == 0 and hook.taps() == []


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("reply", {"from": NUMBER, "button": {"payload": "YES_BOOK", "text": "Yes"}}),
        ("tap", {"from": NUMBER, "payload": "YES_BOOK"}),
    ],
)
def test_answers_by_hand_need_a_webhook(sandbox, route, body):
    send(sandbox, slot_offer())
    answer = by_hand(sandbox, route, body)
    assert answer.status_code == 409 and "--webhook-url" in answer.json()["detail"]

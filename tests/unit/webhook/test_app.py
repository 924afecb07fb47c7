"""The webhook receiver over real HTTP (uvicorn on 127.0.0.1), on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import logging
import sqlite3

import pytest
import requests

from airflow_provider_pepipost.status.store import StatusStore
from airflow_provider_pepipost.webhook.app import create_app
from tests.conftest import WEBHOOK_TOKEN
from tests.helpers import ServedApp

HEADERS = {"X-Pepipost-Token": WEBHOOK_TOKEN}


def report(message_id: str, status: str, at: int = 1_700_000_000, **more) -> dict:
    return {"ncmessage_id": message_id, "recipient": "919999999999", "status": status, "status_remark": "",
            "received_at": str(at), **more}  # fmt: skip


def post(url: str, body, headers=HEADERS, **kwargs) -> requests.Response:
    data = body if isinstance(body, (bytes, str)) or hasattr(body, "__next__") else json.dumps(body)
    return requests.post(url, data=data, headers={"Content-Type": "application/json", **headers}, timeout=10, **kwargs)


def test_a_batch_is_stored_and_counted(receiver, store_url):
    body = {"delivery_status": [report("m1", "sent", 1), report("m1", "read", 3), report("m2", "delivered", 2)]}
    answer = post(receiver.webhook_url, body)
    assert answer.status_code == 200
    assert answer.json() == {"accepted": 3, "duplicates": 0, "rejected": 0, "inbound": 0, "reconciled": 0}
    store = StatusStore(store_url)
    assert (store.current_status("m1"), store.current_status("m2")) == ("read", "delivered")


def test_resent_and_out_of_order_batches(receiver, store_url):
    post(receiver.webhook_url, {"delivery_status": [report("m1", "read", 3)]})
    again = post(receiver.webhook_url, {"delivery_status": [report("m1", "read", 3), report("m1", "delivered", 2)]})
    assert again.json()["duplicates"] == 1 and again.json()["accepted"] == 1
    assert StatusStore(store_url).current_status("m1") == "read"


def test_the_event_is_in_the_database_file_when_200_comes_back(sqlite_receiver):
    answer = post(sqlite_receiver.webhook_url, {"delivery_status": [report("m-durable", "delivered")]})
    assert answer.status_code == 200
    path = sqlite_receiver.store_url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as db:  # a separate connection, as another process would see it
        rows = db.execute("SELECT status FROM pepipost_message_status WHERE message_id='m-durable'").fetchall()
    assert rows == [("delivered",)]


@pytest.mark.parametrize(
    "headers",
    [{}, {"X-Pepipost-Token": "wrong"}, {"X-Pepipost-Token": WEBHOOK_TOKEN.upper()}, {"Authorization": "Bearer nope"}],
)
def test_without_the_right_token_nothing_is_stored(receiver, store_url, headers):
    answer = post(receiver.webhook_url, {"delivery_status": [report("m1", "read")]}, headers=headers)
    assert answer.status_code == 401
    store = StatusStore(store_url)
    assert store.count_rows("pepipost_events") == 0 and store.count_rows("pepipost_dead_letters") == 0


def test_token_as_query_parameter_or_bearer(receiver):
    assert post(f"{receiver.webhook_url}?token={WEBHOOK_TOKEN}", {"delivery_status": []}, headers={}).status_code == 200
    bearer = {"Authorization": f"Bearer {WEBHOOK_TOKEN}"}
    assert post(receiver.webhook_url, {"delivery_status": []}, headers=bearer).status_code == 200


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"delivery_status": [', "invalid JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (("[" * 100_000 + "]" * 100_000).encode(), "nested too deeply"),
    ],
)
def test_unreadable_bodies_are_400_and_kept_as_dead_letters(receiver, store_url, body, reason):
    answer = post(receiver.webhook_url, body)
    assert answer.status_code == 400
    assert reason in answer.json()["detail"]
    assert reason in StatusStore(store_url).dead_letters()[0][0]


def test_malformed_items_are_kept_and_valid_ones_stored(receiver, store_url):
    body = {"delivery_status": [report("m1", "read"), 7, {"status": "read"}]}
    answer = post(receiver.webhook_url, body)
    assert answer.status_code == 200 and answer.json()["accepted"] == 1 and answer.json()["rejected"] == 2
    assert len(StatusStore(store_url).dead_letters()) == 2


def test_inbound_replies_are_acknowledged_and_not_statuses(receiver, store_url):
    body = {"incoming_message": [{"message_id": "in-1", "from": "9199", "context": {"ncmessage_id": "m1"}}]}
    answer = post(receiver.webhook_url, body)
    assert answer.status_code == 200 and answer.json()["inbound"] == 1
    store = StatusStore(store_url)
    assert store.current_status("m1") is None and store.count_rows("pepipost_inbound_messages") == 1


def test_oversized_bodies_are_413(store_url):
    with ServedApp(create_app(store_url, WEBHOOK_TOKEN, max_body_bytes=1000)) as served:
        url = f"{served.url}/pepipost/webhook"
        big = {"delivery_status": [report(f"m{i}", "read") for i in range(50)]}
        assert post(url, big).status_code == 413

        def chunks():  # no Content-Length: the cap holds while streaming
            yield b'{"delivery_status": ['
            for i in range(50):
                yield json.dumps(report(f"m{i}", "read")).encode() + b","
            yield b"{}]}"

        assert post(url, chunks()).status_code == 413
    assert StatusStore(store_url).count_rows("pepipost_events") == 0


def test_wrong_content_type_is_415(receiver):
    answer = requests.post(receiver.webhook_url, data={"a": "b"}, headers=HEADERS, timeout=10)
    assert answer.status_code == 415


def test_source_address_allowlist(store_url):
    with ServedApp(create_app(store_url, WEBHOOK_TOKEN, allowed_ips=["10.0.0.0/8"])) as served:
        assert post(f"{served.url}/pepipost/webhook", {"delivery_status": []}).status_code == 403
    with ServedApp(create_app(store_url, WEBHOOK_TOKEN, allowed_ips=["127.0.0.1"])) as served:
        assert post(f"{served.url}/pepipost/webhook", {"delivery_status": []}).status_code == 200


def test_a_receiver_without_a_token_refuses_everything(sqlite_url, monkeypatch):
    monkeypatch.delenv("PEPIPOST_WEBHOOK_TOKEN", raising=False)
    with ServedApp(create_app(sqlite_url, token="")) as served:
        answer = post(f"{served.url}/pepipost/webhook", {"delivery_status": []}, headers={})
    assert answer.status_code == 503 and "PEPIPOST_WEBHOOK_TOKEN" in answer.json()["detail"]


def test_healthz(receiver):
    assert requests.get(f"{receiver.url}/pepipost/healthz", timeout=5).json()["status"] == "ok"


def test_healthz_and_posts_say_503_when_the_store_is_down():
    with ServedApp(create_app("postgresql+psycopg2://nobody@127.0.0.1:1/none", WEBHOOK_TOKEN)) as served:
        assert requests.get(f"{served.url}/pepipost/healthz", timeout=30).status_code == 503


def test_tokens_in_query_strings_are_redacted_from_access_logs(receiver, caplog):
    logger = logging.getLogger("uvicorn.access")
    with caplog.at_level(logging.INFO, logger="uvicorn.access"):
        logger.info(
            '%s - "%s %s HTTP/%s" %d', "127.0.0.1", "POST", f"/pepipost/webhook?token={WEBHOOK_TOKEN}", "1.1", 200
        )
    assert WEBHOOK_TOKEN not in caplog.text and "token=***" in caplog.text


def test_concurrent_single_event_posts_are_each_stored_and_counted(receiver, store_url):
    from concurrent.futures import ThreadPoolExecutor

    def one(index: int) -> dict:
        return post(receiver.webhook_url, {"delivery_status": [report(f"c{index}", "delivered")]}).json()

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(300)))
    assert all(answer["accepted"] == 1 for answer in answers)
    assert StatusStore(store_url).count_rows("pepipost_events") == 300

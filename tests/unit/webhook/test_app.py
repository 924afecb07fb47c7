"""The webhook receiver over real HTTP (uvicorn on 127.0.0.1), on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import logging
import sqlite3

import pytest
import requests

from airflow_provider_pepipost.status import wal
from airflow_provider_pepipost.status.ingest import IngestResult
from airflow_provider_pepipost.status.store import StatusStore
from airflow_provider_pepipost.webhook.app import JSONAnswer, create_app
from tests.conftest import WEBHOOK_TOKEN
from tests.helpers import ServedApp, wait_until
from tests.store_reads import current_status, dead_letters

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
    assert answer.json() == {
        "accepted": 3,
        "duplicates": 0,
        "dead_letters": 0,
        "inbound": 0,
        "reconciled": 0,
        "opt_outs": 0,
    }
    store = StatusStore(store_url)
    assert (current_status(store, "m1"), current_status(store, "m2")) == ("read", "delivered")


def test_resent_and_out_of_order_batches(receiver, store_url):
    post(receiver.webhook_url, {"delivery_status": [report("m1", "read", 3)]})
    again = post(receiver.webhook_url, {"delivery_status": [report("m1", "read", 3), report("m1", "delivered", 2)]})
    assert again.json()["duplicates"] == 1 and again.json()["accepted"] == 1
    assert current_status(StatusStore(store_url), "m1") == "read"


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
    assert reason in dead_letters(StatusStore(store_url))[0][0]


def test_malformed_items_are_kept_and_valid_ones_stored(receiver, store_url):
    body = {"delivery_status": [report("m1", "read"), 7, {"status": "read"}]}
    answer = post(receiver.webhook_url, body)
    assert answer.status_code == 200 and answer.json()["accepted"] == 1 and answer.json()["dead_letters"] == 2
    assert len(dead_letters(StatusStore(store_url))) == 2


def test_inbound_replies_are_acknowledged_and_not_statuses(receiver, store_url):
    body = {"incoming_message": [{"message_id": "in-1", "from": "9199", "context": {"ncmessage_id": "m1"}}]}
    answer = post(receiver.webhook_url, body)
    assert answer.status_code == 200 and answer.json()["inbound"] == 1
    store = StatusStore(store_url)
    assert current_status(store, "m1") is None and store.count_rows("pepipost_inbound_messages") == 1


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


def test_healthz_says_ok_and_nothing_about_the_store(receiver, store_url):
    answer = requests.get(f"{receiver.url}/pepipost/healthz", timeout=5)
    assert answer.status_code == 200 and answer.json() == {"status": "ok"}


def test_healthz_says_not_ok_and_nothing_more_when_the_store_is_down():
    url = "postgresql+psycopg2://secretuser:secretpw@127.0.0.1:1/secretdb"
    with ServedApp(create_app(url, WEBHOOK_TOKEN)) as served:
        answer = requests.get(f"{served.url}/pepipost/healthz", timeout=30)
    assert answer.status_code == 503 and answer.json() == {"status": "not ok"}
    assert not any(word in answer.text for word in ("secret", "127.0.0.1", "5432", "Error"))


def test_tokens_in_query_strings_are_redacted_from_access_logs(receiver, caplog):
    logger = logging.getLogger("uvicorn.access")
    with caplog.at_level(logging.INFO, logger="uvicorn.access"):
        logger.info(
            '%s - "%s %s HTTP/%s" %d', "127.0.0.1", "POST", f"/pepipost/webhook?token={WEBHOOK_TOKEN}", "1.1", 200
        )
    assert WEBHOOK_TOKEN not in caplog.text and "token=***" in caplog.text


@pytest.mark.parametrize("name", ["tok%65n", "%74oken", "TOKEN", "to%6B%65n"])
def test_tokens_are_redacted_by_their_decoded_parameter_name(receiver, caplog, name):
    # The app reads the decoded name, so each of these carries the token...
    assert post(f"{receiver.webhook_url}?{name}={WEBHOOK_TOKEN}", {"delivery_status": []}, headers={}).ok is (
        name != "TOKEN"
    )
    logger = logging.getLogger("uvicorn.access")
    with caplog.at_level(logging.INFO, logger="uvicorn.access"):
        path = f"/pepipost/webhook?a=1&{name}={WEBHOOK_TOKEN}&b=2"
        logger.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1", "POST", path, "1.1", 200)
    # ...and none of them reaches the access log.
    assert WEBHOOK_TOKEN not in caplog.text and f"{name}=***" in caplog.text and "b=2" in caplog.text


def test_concurrent_single_event_posts_are_each_stored_and_counted(receiver, store_url):
    from concurrent.futures import ThreadPoolExecutor

    def one(index: int) -> dict:
        return post(receiver.webhook_url, {"delivery_status": [report(f"c{index}", "delivered")]}).json()

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(300)))
    assert all(answer["accepted"] == 1 for answer in answers)
    assert StatusStore(store_url).count_rows("pepipost_events") == 300


# -- issue 11: poison items, amplification, bounded queue, refusals, status ---------------------

POISONS = {
    "lone-surrogate": '{"ncmessage_id": "p1", "status": "read", "note": "\\ud800"}',
    "nul": '{"ncmessage_id": "p\\u0000", "status": "read"}',
    "recipient-100": json.dumps({"ncmessage_id": "p3", "status": "read", "recipient": "9" * 100}),
    "status-40": json.dumps({"ncmessage_id": "p4", "status": "s" * 40}),
    "time-10**400": json.dumps({"ncmessage_id": "p5", "status": "read", "received_at": 10**400}),
    "time-1e400": '{"ncmessage_id": "p6", "status": "read", "received_at": 1e400}',
    "time-Infinity": '{"ncmessage_id": "p7", "status": "read", "received_at": Infinity}',
}


@pytest.mark.parametrize("poison", list(POISONS.values()), ids=list(POISONS))
def test_a_poison_item_is_a_dead_letter_and_the_rest_of_its_body_is_stored(receiver, store_url, poison):
    body = '{"delivery_status": [' + json.dumps(report("good-1", "read")) + ", " + poison + "]}"
    answer = post(receiver.webhook_url, body)
    assert answer.status_code == 200, answer.text
    assert (answer.json()["accepted"], answer.json()["dead_letters"]) == (1, 1)
    store = StatusStore(store_url)
    assert current_status(store, "good-1") == "read"
    assert len(dead_letters(store)) == 1
    assert post(receiver.webhook_url, body).status_code == 200  # and the vendor's resend is acknowledged too


def test_a_body_sent_again_adds_no_dead_letters(receiver, store_url):
    body = {"delivery_status": [report("m1", "read"), 7, {"status": "read"}]}
    for _ in range(3):
        assert post(receiver.webhook_url, body).json()["dead_letters"] == 2
    post(receiver.webhook_url, b"{not json")
    post(receiver.webhook_url, b"{not json")
    assert StatusStore(store_url).count_rows("pepipost_dead_letters") == 3


def test_two_mib_of_junk_is_a_bounded_number_of_dead_letters(receiver, store_url):
    junk = b'{"delivery_status": [' + b"1," * (1024 * 1024 - 20) + b"1]}"
    assert len(junk) <= 2 * 1024 * 1024
    for _ in range(2):  # the vendor resends it: still no more rows
        answer = post(receiver.webhook_url, junk)
        assert answer.status_code == 200 and answer.json()["dead_letters"] == 1024 * 1024 - 19
    assert StatusStore(store_url).count_rows("pepipost_dead_letters") <= 21


def test_a_full_ingest_queue_answers_503_with_retry_after(sqlite_url):
    """The store is locked by another process, so bodies pile up: past the bound, come back later."""
    import sqlite3
    import threading

    StatusStore(sqlite_url)
    locker = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")  # holds the write lock until released below
    answers: list[requests.Response] = []
    with ServedApp(create_app(sqlite_url, WEBHOOK_TOKEN, max_queued_bodies=2)) as served:
        url = f"{served.url}/pepipost/webhook"

        def one(index: int) -> None:
            body = json.dumps({"delivery_status": [report(f"q{index}", "read")]})
            answers.append(
                requests.post(url, data=body, headers={**HEADERS, "Content-Type": "application/json"}, timeout=60)
            )

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        assert wait_until(lambda: sum(a.status_code == 503 for a in answers) >= 6, timeout=20)
        locker.execute("ROLLBACK")
        for thread in threads:
            thread.join(timeout=30)
    busy = [a for a in answers if a.status_code == 503]
    assert len(answers) == 8 and len(busy) == 6
    assert all(a.headers.get("Retry-After") == "5" for a in busy)
    assert StatusStore(sqlite_url).count_rows("pepipost_events") == 2  # those admitted, and only those


def test_a_body_that_does_not_arrive_in_time_is_408(sqlite_url):
    import socket

    with ServedApp(create_app(sqlite_url, WEBHOOK_TOKEN, body_timeout=1)) as served, socket.socket() as sock:
        sock.settimeout(10)
        sock.connect(("127.0.0.1", served.port))
        head = f"POST /pepipost/webhook HTTP/1.1\r\nHost: x\r\nX-Pepipost-Token: {WEBHOOK_TOKEN}\r\n"
        sock.sendall(f"{head}Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{".encode())
        assert sock.recv(200).startswith(b"HTTP/1.1 408")


def test_refused_requests_are_logged_by_source_and_rate_limited(sqlite_url, caplog):
    with ServedApp(create_app(sqlite_url, WEBHOOK_TOKEN, refusal_log_interval=3600)) as served:
        with caplog.at_level(logging.WARNING, logger="airflow_provider_pepipost.webhook"):
            for _ in range(5):
                post(f"{served.url}/pepipost/webhook", {"delivery_status": []}, headers={"X-Pepipost-Token": "old"})
        lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert len(lines) == 1 and "1 x 401 from 127.0.0.1" in lines[0]  # one line, not five
        status = requests.get(f"{served.url}/pepipost/status", headers=HEADERS, timeout=10).json()
    assert status["refused_since_start"] == {"401": 5}


def test_the_status_endpoint_needs_the_token_and_says_when_the_last_report_came(receiver, store_url):
    status_url = f"{receiver.url}/pepipost/status"
    assert requests.get(status_url, timeout=10).status_code == 401
    before = requests.get(status_url, headers=HEADERS, timeout=10).json()
    assert before["last_report_at"] is None and before["dead_letters"] == 0
    post(receiver.webhook_url, {"delivery_status": [report("s1", "read"), 7]})
    after = requests.get(status_url, headers=HEADERS, timeout=10).json()
    assert after["last_report_at"] > 0 and after["seconds_since_last_report"] < 60 and after["dead_letters"] == 1


def test_dead_letter_warnings_are_throttled_and_capped(sqlite_receiver, caplog):
    body = {"delivery_status": [{"ncmessage_id": "x" * 5000, "status": "read"}]}
    with caplog.at_level(logging.WARNING, logger="airflow_provider_pepipost.webhook"):
        for _ in range(5):
            assert post(sqlite_receiver.webhook_url, body).json()["dead_letters"] == 1
    lines = [r.getMessage() for r in caplog.records if "dead letters" in r.getMessage()]
    assert len(lines) == 1 and len(lines[0]) < 500


def test_a_body_streamed_in_pieces_is_stored_whole(sqlite_url):
    # No Content-Length: the receiver reads the pieces as they come and joins them.
    items = [report(f"piece-{i}", "read") for i in range(30)]
    encoded = json.dumps({"delivery_status": items}).encode()

    def pieces():
        for start in range(0, len(encoded), 97):
            yield encoded[start : start + 97]

    with ServedApp(create_app(sqlite_url, WEBHOOK_TOKEN)) as served:
        answer = post(f"{served.url}/pepipost/webhook", pieces())
    assert answer.status_code == 200 and answer.json()["accepted"] == 30
    assert StatusStore(sqlite_url).count_rows("pepipost_events") == 30


def test_a_client_gone_in_the_middle_of_its_body_gets_nothing_stored_and_no_error(sqlite_url, caplog):
    import socket

    with ServedApp(create_app(sqlite_url, WEBHOOK_TOKEN)) as served:
        with caplog.at_level(logging.WARNING), socket.create_connection(("127.0.0.1", served.port), 10) as sock:
            head = f"POST /pepipost/webhook HTTP/1.1\r\nHost: x\r\nX-Pepipost-Token: {WEBHOOK_TOKEN}\r\n"
            sock.sendall(f"{head}Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{".encode())
        assert post(f"{served.url}/pepipost/webhook", {"delivery_status": [report("after", "read")]}).ok
    assert StatusStore(sqlite_url).count_rows("pepipost_events") == 1  # only the report sent whole
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


def test_each_stored_bodys_answer_holds_its_own_counts_however_many_sets_of_counts_came_before():
    """The answers are encoded once per set of counts: 600 sets (past the 256 kept) and each again."""
    results = [
        IngestResult(accepted=n % 7, duplicates=n // 7, dead_letters=n % 3, reconciled=n % 2) for n in range(600)
    ]
    for result in results + results[::-1]:
        answer = JSONAnswer.counts(result)
        assert answer.status_code == 200
        assert json.loads(answer.body) == result.to_dict()


def test_the_receiver_checkpoints_a_sqlite_stores_log_beside_its_commits(sqlite_url):
    """Not inside a commit, where every request of that commit waited for it (status.wal)."""
    with ServedApp(create_app(sqlite_url, WEBHOOK_TOKEN)) as served:
        for n in range(3):
            assert post(f"{served.url}/pepipost/webhook", {"delivery_status": [report(f"w{n}", "read")]}).ok
        checkpoints = wal._ATTACHED.get(StatusStore(sqlite_url).engine)
        assert checkpoints is not None, "the receiver's store has no checkpoints of its own"
        assert wait_until(lambda: checkpoints.checkpoints >= 1, timeout=10)
        with StatusStore(sqlite_url).engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == wal.BACKSTOP_PAGES

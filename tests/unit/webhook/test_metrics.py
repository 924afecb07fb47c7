"""The receiver's /metrics: a real scrape over loopback counts what was stored and refused, and why."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests

from airflow_provider_pepipost.status.store import StatusStore
from airflow_provider_pepipost.webhook.app import create_app
from airflow_provider_pepipost.webhook.metrics import REFUSAL_REASONS
from tests.conftest import WEBHOOK_TOKEN
from tests.helpers import ServedApp, free_port, scrape_metrics, wait_until
from tests.unit.webhook.test_app import HEADERS, post, report
from tests.unit.webhook.test_stop_words import text_reply

BIN = Path(sys.executable).parent


def scrape(base_url: str, **headers: str) -> dict[tuple[str, tuple], float]:
    return scrape_metrics(f"{base_url}/pepipost/metrics", WEBHOOK_TOKEN, **headers)


def refused(samples: dict, reason: str) -> float:
    return samples[("pepipost_receiver_refusals_total", (("reason", reason),))]


def test_a_scrape_counts_what_was_stored_and_what_was_refused_by_reason(receiver, store_url):
    base = receiver.url
    first = scrape(base)
    assert {reason for reason in REFUSAL_REASONS if refused(first, reason) == 0} == set(REFUSAL_REASONS)

    post(receiver.webhook_url, {"delivery_status": [report("m1", "sent", 1), report("m2", "sent", 1)]})
    post(receiver.webhook_url, {"delivery_status": [report("m1", "sent", 1), report("m1", "read", 3)]})
    stop = text_reply("919876543210", "STOP", "in-metrics-1")
    post(receiver.webhook_url, {"incoming_message": [stop]})
    assert post(receiver.webhook_url, {"delivery_status": [{"status": "read"}]}).status_code == 200  # no id
    assert post(receiver.webhook_url, b"not json at all").status_code == 400
    assert post(receiver.webhook_url, {"delivery_status": []}, headers={"X-Pepipost-Token": "wrong"}).status_code == 401
    ctype = {**HEADERS, "Content-Type": "text/html"}
    assert requests.post(receiver.webhook_url, data="{}", headers=ctype, timeout=10).status_code == 415
    assert requests.get(f"{base}/pepipost/metrics", timeout=10).status_code == 401  # the scrape needs the token

    samples = scrape(base)
    assert samples[("pepipost_receiver_reports_total", (("result", "accepted"),))] == 3
    assert samples[("pepipost_receiver_reports_total", (("result", "duplicate"),))] == 1
    assert samples[("pepipost_receiver_replies_total", ())] == 1
    assert samples[("pepipost_receiver_opt_outs_total", ())] == 1
    store = StatusStore(store_url)
    assert samples[("pepipost_receiver_dead_letters_total", ())] == store.count_rows("pepipost_dead_letters") == 2
    assert refused(samples, "bad_token") == 2 and refused(samples, "not_json") == 1
    assert refused(samples, "unreadable") == 1 and refused(samples, "busy") == 0
    # Every body that reached the store was timed, the unreadable one included (its dead letter).
    assert samples[("pepipost_receiver_ingest_seconds_count", ())] == 5
    assert samples[("pepipost_receiver_queued_bodies", ())] == 0
    assert samples[("pepipost_receiver_store_errors_total", ())] == 0


def test_no_text_of_a_request_becomes_a_label(receiver):
    """A label from the request would let any client grow every scrape without bound."""
    for index in range(5):
        ctype = {**HEADERS, "Content-Type": f"text/x-{index}"}
        requests.post(receiver.webhook_url, data="{}", headers=ctype, timeout=10)
    labels = {labels for (name, labels) in scrape(receiver.url) if name == "pepipost_receiver_refusals_total"}
    assert labels == {(("reason", reason),) for reason in REFUSAL_REASONS}


def test_the_queue_depth_shows_bodies_waiting_on_a_locked_store_and_busy_refusals(sqlite_url):
    StatusStore(sqlite_url)
    locker = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")  # another process holds the write lock: bodies wait
    answers: list[int] = []
    with ServedApp(create_app(sqlite_url, WEBHOOK_TOKEN, max_queued_bodies=2)) as served:
        url = f"{served.url}/pepipost/webhook"

        def one(index: int) -> None:
            answers.append(post(url, {"delivery_status": [report(f"q{index}", "read")]}).status_code)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(5)]
        for thread in threads:
            thread.start()
        try:
            assert wait_until(lambda: answers.count(503) == 3, timeout=20)
            waiting = scrape(served.url)
            assert waiting[("pepipost_receiver_queued_bodies", ())] == 2
            assert waiting[("pepipost_receiver_queued_bytes", ())] > 0
            assert refused(waiting, "busy") == 3
        finally:
            locker.execute("ROLLBACK")
            for thread in threads:
                thread.join(timeout=30)
        after = scrape(served.url)
    assert sorted(answers) == [200, 200, 503, 503, 503]
    assert after[("pepipost_receiver_queued_bodies", ())] == 0
    assert after[("pepipost_receiver_queued_bytes", ())] == 0
    assert after[("pepipost_receiver_reports_total", (("result", "accepted"),))] == 2
    # Both waited on the lock: their commit took at least the time the scrape above saw them queued.
    assert after[("pepipost_receiver_ingest_seconds_bucket", (("le", "0.001"),))] == 0


def test_a_store_that_cannot_commit_is_counted():
    down = "postgresql+psycopg2://nobody@127.0.0.1:1/none"  # nothing listens on port 1
    with ServedApp(create_app(down, WEBHOOK_TOKEN)) as served:
        answer = post(f"{served.url}/pepipost/webhook", {"delivery_status": [report("m1", "read")]})
        assert answer.status_code == 503
        samples = scrape(served.url)
    assert samples[("pepipost_receiver_store_errors_total", ())] == 1
    assert samples[("pepipost_receiver_reports_total", (("result", "accepted"),))] == 0
    assert samples[("pepipost_receiver_queued_bodies", ())] == 0


@pytest.mark.timeout(120)
def test_with_several_workers_any_scrape_answers_for_all_of_them(sqlite_url, tmp_path):
    """``pepipost-webhook --workers 2``: each worker counts apart; every scrape sums them."""
    StatusStore(sqlite_url)
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key != "PROMETHEUS_MULTIPROC_DIR"}
    env["PEPIPOST_WEBHOOK_TOKEN"] = WEBHOOK_TOKEN
    process = subprocess.Popen(
        [str(BIN / "pepipost-webhook"), "--port", str(port), "--store-url", sqlite_url, "--workers", "2"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            try:
                return requests.get(f"{base}/pepipost/healthz", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False

        assert wait_until(up, timeout=60), "the receiver did not start"
        for index in range(40):  # a new connection each: the kernel spreads them over both workers
            body = json.dumps({"delivery_status": [report(f"w{index}", "delivered")]})
            headers = {**HEADERS, "Content-Type": "application/json", "Connection": "close"}
            assert requests.post(f"{base}/pepipost/webhook", data=body, headers=headers, timeout=10).status_code == 200
        totals = set()
        for _ in range(8):
            totals.add(scrape(base, Connection="close")[("pepipost_receiver_reports_total", (("result", "accepted"),))])
        assert totals == {40.0}
        assert StatusStore(sqlite_url).count_rows("pepipost_events") == 40
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_dead_workers_queue_gauge_is_dropped_from_the_sum(tmp_path):
    """A worker killed with bodies in its queue (then restarted by uvicorn) must not keep them in
    the scrape forever: its gauge files are dropped once its process is gone."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    worker = (
        "from airflow_provider_pepipost.webhook.metrics import ReceiverMetrics\n"
        "metrics = ReceiverMetrics(); metrics.queue_now(3, 900)\n"
        "import os; os._exit(0)  # no clean-up, as a SIGKILL leaves it\n"
    )
    subprocess.run([sys.executable, "-c", worker], env=env, check=True, timeout=60)
    scrape_now = (
        "from airflow_provider_pepipost.webhook.metrics import ReceiverMetrics\n"
        "print(ReceiverMetrics().exposition().decode())\n"
    )
    text = subprocess.run([sys.executable, "-c", scrape_now], env=env, check=True, timeout=60, capture_output=True,
                          text=True).stdout  # fmt: skip
    queued = [line for line in text.splitlines() if line.startswith("pepipost_receiver_queued_bodies ")]
    assert queued == ["pepipost_receiver_queued_bodies 0.0"], text

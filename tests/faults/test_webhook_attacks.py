"""The receiver under faults and attack: replays, crashes between commit and answer, hostile bodies, fuzz."""

from __future__ import annotations

import json

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from airflow_provider_pepipost.status.store import StatusStore
from airflow_provider_pepipost.webhook.app import create_app
from airflow_provider_pepipost.webhook.payload import parse_body
from tests.conftest import WEBHOOK_TOKEN
from tests.helpers import ServedApp
from tests.store_reads import current_status

HEADERS = {"X-Pepipost-Token": WEBHOOK_TOKEN, "Content-Type": "application/json"}


def item(message_id: str, status: str, at: int = 1_700_000_000) -> dict:
    return {"ncmessage_id": message_id, "status": status, "received_at": str(at), "recipient": "919800000000"}


def test_a_replayed_batch_is_stored_once(receiver, store_url):
    body = json.dumps({"delivery_status": [item("m1", "sent", 1), item("m1", "read", 3)]})
    answers = [requests.post(receiver.webhook_url, data=body, headers=HEADERS, timeout=10).json() for _ in range(3)]
    assert [a["accepted"] for a in answers] == [2, 0, 0] and answers[-1]["duplicates"] == 2
    assert StatusStore(store_url).count_rows("pepipost_events") == 2


def test_a_batch_resent_after_a_crash_between_commit_and_answer(receiver, store_url):
    """The receiver committed, then died before answering: the vendor sends the batch again."""
    batch = [item("m1", "delivered", 2), item("m2", "failed", 2)]
    from airflow_provider_pepipost.webhook.payload import parse_body as parse

    StatusStore(store_url).ingest(parse({"delivery_status": batch}).events)  # committed, never acknowledged
    answer = requests.post(receiver.webhook_url, json={"delivery_status": batch}, headers=HEADERS, timeout=10)
    assert answer.status_code == 200 and answer.json()["duplicates"] == 2
    store = StatusStore(store_url)
    assert store.count_rows("pepipost_events") == 2
    assert (current_status(store, "m1"), current_status(store, "m2")) == ("delivered", "failed")


def test_a_forged_read_cannot_undo_a_failure_even_with_the_token(receiver, store_url):
    requests.post(receiver.webhook_url, json={"delivery_status": [item("m1", "failed")]}, headers=HEADERS, timeout=10)
    requests.post(receiver.webhook_url, json={"delivery_status": [item("m1", "read", 9)]}, headers=HEADERS, timeout=10)
    assert current_status(StatusStore(store_url), "m1") == "failed"


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"[" * 50_000 + b"]" * 50_000, 400),
        (json.dumps({"delivery_status": [item(f"m{i}", "read") for i in range(5000)]}).encode(), 200),
        (b"\xc3\x28", 400),
        (b"null", 400),
        (
            json.dumps({"delivery_status": [1, "x", None, [], {"ncmessage_id": {"a": 1}, "status": "read"}]}).encode(),
            200,
        ),
        (json.dumps({"delivery_status": [item("m1", "QUEUED")], "incoming_message": [{"from": "91"}]}).encode(), 200),
    ],
    ids=["deep-nesting", "big-batch", "bad-utf8", "null", "non-object-items", "unknown-status-and-inbound"],
)
def test_hostile_bodies_get_a_4xx_or_an_acknowledgement_never_a_500(receiver, store_url, body, status):
    answer = requests.post(receiver.webhook_url, data=body, headers=HEADERS, timeout=30)
    assert answer.status_code == status, answer.text


def test_unknown_statuses_are_kept_and_inbound_messages_are_not_statuses(receiver, store_url):
    body = {"delivery_status": [item("m1", "QUEUED")], "incoming_message": [{"from": "91", "message_id": "in"}]}
    answer = requests.post(receiver.webhook_url, json=body, headers=HEADERS, timeout=10).json()
    assert (answer["accepted"], answer["inbound"]) == (1, 1)
    assert current_status(StatusStore(store_url), "m1") == "queued"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-Pepipost-Token": ""},
        {"X-Pepipost-Token": WEBHOOK_TOKEN + "x"},
        {"X-Pepipost-Token": WEBHOOK_TOKEN.swapcase()},
        {"Authorization": WEBHOOK_TOKEN},
    ],
)
def test_nothing_is_accepted_without_the_token(receiver, store_url, headers):
    body = {"delivery_status": [item("m1", "read")]}
    answer = requests.post(receiver.webhook_url, json=body, headers=headers, timeout=10)
    assert answer.status_code == 401
    assert StatusStore(store_url).count_rows("pepipost_events") == 0


# -- fuzzing -------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
valid_items = st.builds(
    lambda mid, status, at: {"ncmessage_id": mid, "status": status, "received_at": at},
    st.text(alphabet="abcdef0123456789-", min_size=1, max_size=40),
    st.sampled_from(["sent", "delivered", "read", "failed", "READ", "Failed", "queued"]),
    st.one_of(st.integers(0, 2**31), st.just("2019-05-16 15:36:58"), st.integers(0, 2**31).map(str)),
)
items = st.one_of(valid_items, json_values, valid_items.map(lambda i: {**i, **{"x-apiheader": "h"}}))
bodies = st.one_of(json_values, st.builds(lambda xs: {"delivery_status": xs}, st.lists(items, max_size=8)))


@settings(max_examples=400, deadline=None)
@given(body=bodies)
def test_fuzz_the_parser_never_raises_and_keeps_every_valid_item(body):
    batch = parse_body(body)
    if isinstance(body, dict) and isinstance(body.get("delivery_status"), list):
        valid = [i for i in body["delivery_status"] if _is_valid(i)]
        assert len(batch.events) >= len(valid)
        assert len(batch.events) + len(batch.dead_letters) == len(body["delivery_status"])
    else:
        assert batch.events == [] and batch.dead_letters


def _is_valid(item) -> bool:
    return (
        isinstance(item, dict)
        and isinstance(item.get("ncmessage_id"), str)
        and item["ncmessage_id"].strip()
        and isinstance(item.get("status"), str)
        and set(item) <= {"ncmessage_id", "status", "received_at", "x-apiheader"}
    )


@pytest.fixture(scope="module")
def fuzz_receiver(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'status.db'}"
    with ServedApp(create_app(url, WEBHOOK_TOKEN)) as served:
        yield served, StatusStore(url)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies)
def test_fuzz_the_endpoint_answers_no_500_and_stores_every_valid_item(fuzz_receiver, body):
    served, store = fuzz_receiver
    before = store.count_rows("pepipost_events") + store.count_rows("pepipost_dead_letters")
    answer = requests.post(f"{served.url}/pepipost/webhook", data=json.dumps(body), headers=HEADERS, timeout=30)
    assert answer.status_code in (200, 400), answer.text
    if answer.status_code == 200:
        result = answer.json()
        delivered = body.get("delivery_status") if isinstance(body, dict) else None
        if isinstance(delivered, list):
            assert result["accepted"] + result["duplicates"] + result["dead_letters"] >= len(delivered)
    after = store.count_rows("pepipost_events") + store.count_rows("pepipost_dead_letters")
    assert after >= before  # nothing is ever removed

"""ClaimWhatsAppRepliesOperator on a real store (SQLite and PostgreSQL): a run takes its triggering
replies and sweeps up the matching ones no run took; each reply goes to one run only."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
from airflow.sdk import Asset, AssetWatcher

from airflow_provider_pepipost.operators.replies import ClaimWhatsAppRepliesOperator
from airflow_provider_pepipost.status.inbound import ButtonReply
from airflow_provider_pepipost.status.store import StatusStore
from airflow_provider_pepipost.triggers.replies import WhatsAppReplyTrigger
from airflow_provider_pepipost.version_compat import AirflowSkipException
from tests.conftest import STORE_CONN_ID

WATCHER = WhatsAppReplyTrigger(button_payloads=["YES"], status_store_conn_id=STORE_CONN_ID)
YES = Asset("pepipost://replies/test/yes", watchers=[AssetWatcher(name="yes", trigger=WATCHER)])


def tap(store: StatusStore, n: int, payload: str = "YES") -> int:
    raw = json.dumps({"n": n, "payload": payload})
    store.ingest([], inbound=[ButtonReply("button", f"91980000{n:04d}", None, raw, payload=payload)])
    return max(reply.inbound_id for reply in store.replies_after(0, 10_000))


class TriggeringEvents(dict):
    """As Airflow's accessor of ``triggering_asset_events``: keyed by the asset's name and URI, not by
    the Asset (Airflow 3.1's ``Asset.__hash__`` hashes a dict and raises TypeError)."""

    def __getitem__(self, asset: Asset) -> list:
        return super().__getitem__((asset.name, asset.uri))

    def __contains__(self, asset: object) -> bool:
        return isinstance(asset, Asset) and super().__contains__((asset.name, asset.uri))


def run(run_id: str, triggering: list[int] | None = None, asset: Asset = YES, **kwargs):
    """The operator's execute in a run whose triggering events carry these replies."""
    payloads = [{"from_trigger": True, "payload": {"inbound_id": i}} for i in triggering or []]
    events = TriggeringEvents({(asset.name, asset.uri): [SimpleNamespace(extra=extra) for extra in payloads]})
    context = {"dag_run": SimpleNamespace(dag_id="router", run_id=run_id),
               "triggering_asset_events": events if triggering is not None else {}}  # fmt: skip
    operator = ClaimWhatsAppRepliesOperator(task_id="claim", asset=asset, **kwargs)
    try:
        return [row["inbound_id"] for row in operator.execute(context)]
    except AirflowSkipException:
        return "skipped"


@pytest.fixture
def store(store_url: str, use_store) -> StatusStore:
    use_store(store_url)
    return StatusStore(store_url)


def test_a_run_takes_its_taps_and_sweeps_up_the_ones_airflow_left_and_none_twice(store):
    old = tap(store, 1)  # before the watcher's feed existed: never swept
    store.open_reply_cursor(WATCHER.feed_name())  # as the triggerer does when the watcher starts
    first, second, _no, third = tap(store, 2), tap(store, 3), tap(store, 4, "NO"), tap(store, 5)
    assert old < first
    assert run("run-a", [first], sweep=False) == [first]
    assert run("run-b", [first, second]) == [second, third]  # `third`'s event was left to a later run
    assert run("run-c", [third]) == "skipped"  # handled by run-b
    assert run("run-a", [first], sweep=False) == [first]  # a retry of run-a gets its own back
    assert run("manual") == "skipped"  # by hand: nothing left; the NO tap and the old one never match


def test_the_asset_must_be_watched_by_a_reply_trigger_and_the_window_positive():
    with pytest.raises(ValueError, match="one AssetWatcher with a WhatsAppReplyTrigger, found 0"):
        ClaimWhatsAppRepliesOperator(task_id="claim", asset=Asset("pepipost://replies/none"))
    with pytest.raises(ValueError, match="sweep_window"):
        ClaimWhatsAppRepliesOperator(task_id="claim", asset=YES, sweep_window=0)


def test_without_a_feed_there_is_nothing_to_sweep(store):
    tap(store, 1)
    assert run("manual") == "skipped"


def test_a_consumer_sweeps_nothing_from_before_its_first_run(store):
    store.open_reply_cursor(WATCHER.feed_name())
    before = [tap(store, n) for n in range(1, 4)]  # another consumer's time, or no consumer's
    first = tap(store, 4)
    assert run("run-a", [first]) == [first]  # its first run: the triggering tap, none of the earlier ones
    later = tap(store, 5)
    assert run("manual") == [later]
    assert not set(before) & set(claimed_by(store, "router"))


def test_the_sweep_pages_past_replies_the_filter_leaves_and_keeps_to_its_window(store, monkeypatch):
    from airflow_provider_pepipost.operators import replies as operator_module
    from airflow_provider_pepipost.status import schema

    monkeypatch.setattr(operator_module, "SWEEP_PAGE", 3)
    words = WhatsAppReplyTrigger(kinds=["text"], keywords=["yes"], status_store_conn_id=STORE_CONN_ID)
    asset = Asset("pepipost://replies/test/words", watchers=[AssetWatcher(name="words", trigger=words)])
    store.open_reply_cursor(words.feed_name())
    run("first", [], asset=asset)  # the consumer's first run: it starts here
    from airflow_provider_pepipost.status.inbound import TextReply

    def said(n: int, text: str) -> int:
        store.ingest([], inbound=[TextReply("text", f"9198000{n:05d}", None, json.dumps({"n": n}), text=text)])
        return max(reply.inbound_id for reply in store.replies_after(0, 10_000))

    stale = said(0, "YES")
    for n in range(1, 8):
        said(n, "thanks")  # more than two pages the filter leaves out
    wanted = said(9, "yes!")
    with store.engine.begin() as conn:  # the first YES is older than the sweep's window
        conn.execute(schema.inbound_messages.update().where(schema.inbound_messages.c.id == stale).values(
            received_at=time.time() - 3600))  # fmt: skip
    assert run("manual", asset=asset, sweep_window=600) == [wanted]


def test_a_claimed_reply_erased_since_is_left_out_not_the_whole_run(store):
    store.open_reply_cursor(WATCHER.feed_name())
    kept, erased = tap(store, 1), tap(store, 2)
    store.erase("919800000002", key="test-erasure-key")
    assert run("run-a", [kept, erased]) == [kept]


def claimed_by(store: StatusStore, consumer: str) -> list[int]:
    from airflow_provider_pepipost.status import schema

    claims = schema.reply_claims
    with store.engine.connect() as conn:
        return list(conn.execute(claims.select().with_only_columns(claims.c.inbound_id).where(
            claims.c.consumer == consumer)).scalars())  # fmt: skip

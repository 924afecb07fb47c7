"""Button taps start DAGs, each handled once, across a triggerer killed in the middle.

Under the real api-server, scheduler, dag-processor and triggerer: the offer example
(`whatsapp_offer_with_buttons`) is triggered by hand and sends its template with quick replies;
then 50 "Yes, book it" taps are posted to the receiver as the vendor would post them, with taps
that must start nothing among them (the other button, text replies, a tap that answers no message
of that DAG). `whatsapp_reply_router`, scheduled on the asset `WhatsAppReplyTrigger` watches,
must send each of the 50 tappers one confirmation, however many runs Airflow makes, though the
triggerer is killed (SIGKILL) while taps arrive and started again. The time from each tap to the
start of the task that handled it is printed (median, p95).
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from typing import Any

import pytest
import requests
import sqlalchemy

from airflow_provider_pepipost.status import schema
from airflow_provider_pepipost.status.store import StatusStore
from tests.conftest import connection_json, store_env
from tests.helpers import free_port, wait_until
from tests.system.stack import BIN, EXAMPLES_FOLDER, AirflowStack, Sandbox, StackFailure, start_receiver

pytestmark = pytest.mark.system

OFFER, ROUTER = "whatsapp_offer_with_buttons", "whatsapp_reply_router"
TOKEN = "system-test-webhook-token"
AUDIENCE = 70
YES_TAPS = 50
CONSUMER = "whatsapp_reply_router"


def test_fifty_taps_are_each_handled_once_across_a_triggerer_killed_in_the_middle(tmp_path, fresh_database):
    dags = tmp_path / "dags"
    dags.mkdir()
    for dag_id in (OFFER, ROUTER):
        shutil.copy(EXAMPLES_FOLDER / f"{dag_id}.py", dags)
    store_url = fresh_database()
    sandbox = Sandbox()
    env = {
        "AIRFLOW_CONN_PEPIPOST_DEFAULT": connection_json(sandbox.url),
        "PEPIPOST_WEBHOOK_TOKEN": TOKEN,
        # A killed triggerer's triggers go to the new one once its heartbeat is this old.
        "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "5",
        **store_env(store_url),
    }
    stack = AirflowStack(tmp_path, fresh_database(), env, dags_folder=dags)
    store = StatusStore(store_url)
    try:
        receiver = start_receiver(stack.procs, "receiver", free_port())
        sandbox.start(stack.procs, receiver, {"latency": 0.01, "status_delay": 0.2, "final_mix": {"read": 1.0}})
        stack.start([OFFER, ROUTER])
        stack.wait(lambda: feed_opened(store), 120, "the reply trigger never opened its feed in the store")

        stack.trigger(OFFER, "manual-offer", {"audience_size": AUDIENCE})
        stack.wait(lambda: task_state(stack, OFFER, "send_offer") == "success", 180, "the offer was not sent")
        sent = sent_messages(store)  # number -> message id, in audience order
        numbers = list(sent)
        tappers, others = numbers[:YES_TAPS], numbers[YES_TAPS:]

        tapped_at: dict[str, float] = {}
        post = Poster(receiver)
        for number in tappers[:20]:
            tapped_at[number] = post.tap(number, sent[number], "YES_BOOK")
        post_noise(post, others, sent)
        stack.wait(lambda: claimed(store) >= 8, 120, "the router handled no tap")

        # The triggerer dies with taps on the way; more come while it is down.
        stack.procs.kill_tree("triggerer")
        for number in tappers[20:40]:
            tapped_at[number] = post.tap(number, sent[number], "YES_BOOK")
        stack.procs.start("triggerer", str(BIN / "airflow"), "triggerer")
        for number in tappers[40:]:
            tapped_at[number] = post.tap(number, sent[number], "YES_BOOK")
        post_noise(post, others, sent)

        # The runs the taps' own events start; then one by hand, which sweeps up the taps whose
        # events Airflow 3.3.2 left to a later run (apache/airflow#56050).
        stack.wait(Settled(stack, store), 300, "the router's runs did not settle")
        by_events = claimed(store)
        stack.trigger(ROUTER, "manual-sweep")
        stack.wait(lambda: claimed(store) >= YES_TAPS, 120, f"the router did not handle all {YES_TAPS} taps")
        wait_for_router_runs(stack)
        time.sleep(10)  # anything fired twice would start one more run by now
        wait_for_router_runs(stack)

        claims = claim_rows(store)
        tap_ids = {store.reply(inbound_id).sender: inbound_id for inbound_id in claims}
        assert sorted(tap_ids) == sorted(tappers), "each tapper's tap was claimed, and only theirs"
        assert len(claims) == YES_TAPS
        per_number = {n: accepted_for(sandbox, n) for n in numbers}
        assert {n for n, count in per_number.items() if count == 2} == set(tappers), per_number  # offer + confirmation
        assert all(per_number[n] == 1 for n in others), per_number  # the offer only
        events = asset_event_payloads(stack)
        assert {event["inbound_id"] for event in events} == set(claims), "taps that match nothing fired nothing"
        assert all(e["button_payload"] == "YES_BOOK" and e["in_reply_to"]["dag_id"] == OFFER for e in events)
        assert not any(number in json.dumps(events) for number in numbers), "no whole number in an asset event"
        stack.wait(lambda: run_state(stack, OFFER, "manual-offer") == "success", 120, "the offer's reply sensor")

        waits = handling_delays(stack, store, tapped_at)
        print(
            f"\n{YES_TAPS} taps: {by_events} handled by the runs their events started, {YES_TAPS - by_events} by the "
            f"sweep; {len(events)} asset events, {len(router_runs(stack))} router runs; tap -> handling task start "
            f"(event-started runs): median {statistics.median(waits):.1f} s, "
            f"p95 {statistics.quantiles(waits, n=20)[-1]:.1f} s, max {max(waits):.1f} s"
        )
        stack.procs.alive()
    finally:
        stack.stop()
        store.engine.dispose()


class Poster:
    """Customer messages posted to the receiver as the vendor posts them, one body each."""

    def __init__(self, webhook_url: str) -> None:
        self.url = webhook_url
        self.count = 0

    def post(self, item: dict[str, Any]) -> float:
        self.count += 1
        item = {"message_id": f"in-{self.count}", "received_at": str(int(time.time())), **item}
        answer = requests.post(self.url, json={"incoming_message": [item]}, headers={"X-Pepipost-Token": TOKEN},
                               timeout=30)  # fmt: skip
        assert answer.status_code == 200 and answer.json()["inbound"] == 1, answer.text
        time.sleep(0.1)
        return time.time()

    def tap(self, number: str, message_id: str | None, payload: str) -> float:
        text = {"YES_BOOK": "Yes, book it", "NOT_NOW": "Not now"}[payload]
        return self.post({"from": number, "message_type": "button", "text_type": {"payload": payload, "text": text},
                          "context": {"ncmessage_id": message_id}})  # fmt: skip


def post_noise(post: Poster, others: list[str], sent: dict[str, str]) -> None:
    """Replies the router's filters leave out: the other button, words, and a yes to nothing it sent."""
    for number in others[:5]:
        post.tap(number, sent[number], "NOT_NOW")
    for number in others[5:10]:
        post.post({"from": number, "message_type": "text", "text_type": {"text": "Yes, book it"},
                   "context": {"ncmessage_id": sent[number]}})  # fmt: skip
    post.tap(others[10], None, "YES_BOOK")  # answers no message the offer sent


def feed_opened(store: StatusStore) -> bool:
    with store.engine.connect() as conn:
        return conn.execute(sqlalchemy.select(sqlalchemy.func.count()).select_from(schema.reply_cursors)).scalar() > 0


def sent_messages(store: StatusStore) -> dict[str, str]:
    """The offer's accepted messages: number -> message id, in audience order."""
    led = schema.ledger
    query = (
        sqlalchemy.select(led.c.recipient, led.c.message_id)
        .where(led.c.dag_id == OFFER, led.c.message_id.is_not(None))
        .order_by(led.c.row_index)
    )
    with store.engine.connect() as conn:
        accepted = dict(conn.execute(query).all())
    assert len(accepted) >= YES_TAPS + 11, f"only {len(accepted)} of {AUDIENCE} offers were accepted"
    return accepted


def claim_rows(store: StatusStore) -> list[int]:
    claims = schema.reply_claims
    with store.engine.connect() as conn:
        query = sqlalchemy.select(claims.c.inbound_id).where(claims.c.consumer == CONSUMER)
        return list(conn.execute(query).scalars())


def claimed(store: StatusStore) -> int:
    return len(claim_rows(store))


def accepted_for(sandbox: Sandbox, number: str) -> int:
    return requests.get(f"{sandbox.url}/_sandbox/recipients/{number}", timeout=5).json()["accepted"]


def task_state(stack: AirflowStack, dag_id: str, task_id: str) -> str | None:
    states = [ti["state"] for ti in stack.task_instances(dag_id) if ti["task_id"] == task_id]
    return states[0] if states else None


def run_state(stack: AirflowStack, dag_id: str, run_id: str) -> str | None:
    return {run: state for run, state, _ in stack.run_states([dag_id]).get(dag_id, [])}.get(run_id)


def router_runs(stack: AirflowStack) -> list[tuple[str, str, Any]]:
    return stack.run_states([ROUTER]).get(ROUTER, [])


class Settled:
    """Called: True once no router run is going and the claims have not changed for ``quiet`` seconds."""

    def __init__(self, stack: AirflowStack, store: StatusStore, quiet: float = 15.0) -> None:
        self.stack, self.store, self.quiet = stack, store, quiet
        self.count, self.since = -1, time.monotonic()

    def __call__(self) -> bool:
        going = any(state in ("queued", "running") for _, state, _ in router_runs(self.stack))
        now, count = time.monotonic(), claimed(self.store)
        if going or count != self.count:
            self.count, self.since = count, now
            return False
        return now - self.since >= self.quiet


def wait_for_router_runs(stack: AirflowStack, timeout: float = 180) -> None:
    """Until no router run is queued or running; fails on a failed one."""

    def settled() -> bool:
        runs = router_runs(stack)
        if any(state == "failed" for _, state, _ in runs):
            raise StackFailure(f"a router run failed: {stack.task_instances(ROUTER)}\n{stack.task_log_tails()}")
        return bool(runs) and all(state == "success" for _, state, _ in runs)

    if not wait_until(settled, timeout=timeout, interval=1):
        raise StackFailure(f"router runs still going after {timeout:g}s: {router_runs(stack)}")


def asset_event_payloads(stack: AirflowStack) -> list[dict[str, Any]]:
    query = sqlalchemy.text(
        "SELECT e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id WHERE a.uri = :uri ORDER BY e.id"
    )
    with stack.metadata.connect() as conn:
        extras = conn.execute(query, {"uri": f"pepipost://replies/{OFFER}/yes"}).scalars().all()
    return [(json.loads(extra) if isinstance(extra, str) else extra)["payload"] for extra in extras]


def handling_delays(stack: AirflowStack, store: StatusStore, tapped_at: dict[str, float]) -> list[float]:
    """Seconds from each tap to the start of the router task that claimed it."""
    starts = {}
    for run_id, _, _ in router_runs(stack):
        if not run_id.startswith("asset_triggered"):
            continue
        for ti in stack.task_instances(ROUTER, run_id):
            if ti["task_id"] == "claim_taps" and ti["start_date"] is not None:
                starts[run_id] = ti["start_date"].timestamp()
    claims = schema.reply_claims
    with store.engine.connect() as conn:
        rows = conn.execute(
            sqlalchemy.select(claims.c.inbound_id, claims.c.run_id).where(claims.c.consumer == CONSUMER)
        )
        handled = rows.all()
    return [starts[run_id] - tapped_at[store.reply(inbound_id).sender] for inbound_id, run_id in handled
            if run_id in starts]  # fmt: skip

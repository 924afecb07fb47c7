"""Campaigns across Celery workers: the unchanged examples under CeleryExecutor, and a worker killed mid-send.

Airflow's api-server, scheduler, dag-processor and triggerer, two ``airflow celery worker``
processes (Redis as the broker, each worker under its own hostname), PostgreSQL as Airflow's
metadata database and as the status store, the sandbox, and two ``pepipost-webhook`` receivers
behind a round-robin balancer that splits the sandbox's reports between them. Nothing of the
provider coordinates the workers: Airflow hands out the mapped sends, the ledger keeps retries
from sending twice.

1. The mapped example (8 segments of 250 rows) and the template example, triggered by hand: both
   runs succeed, both workers ran mapped sends, every row was accepted once (counted at the sandbox,
   in its reports and in the ledger), and the store holds every report the sandbox posted.
2. One worker is killed (SIGKILL, its whole process tree) in the middle of a mapped send; Airflow
   notices the missing heartbeat and retries the task on the other worker: no message twice, and
   every row of the audience is in the ledger, accepted, refused by the vendor, or unknown (claimed
   by the killed try and never received by the vendor).
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import uuid
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests
import sqlalchemy

from tests.conftest import connection_json, store_env
from tests.helpers import free_port
from tests.system.stack import (
    EXAMPLES_SCENARIO,
    AirflowStack,
    Sandbox,
    StackFailure,
    celery_stack_problem,
    forget_celery_queue,
    start_receiver,
)

pytestmark = [pytest.mark.system, pytest.mark.timeout(480)]

REDIS_URL_ENV = "PEPIPOST_TEST_REDIS_URL"
MAPPED, TEMPLATE = "whatsapp_media_campaign_mapped", "whatsapp_template_campaign"
WORKERS = ("worker-a", "worker-b")
TOKEN = "celery-test-webhook-token"
SEGMENTS, PER_SEGMENT = 8, 250
KILL_SEGMENTS, KILL_PER_SEGMENT = 2, 200
# Most answers come 0.25 s after the sandbox accepted the message: a send of 200 rows with the
# example's 4 threads takes about 10 s, and a worker killed mid-send leaves both kinds of rows in
# flight: accepted by the vendor with the answer lost (the reports reconcile them) and claimed but
# never sent (unknown for good). The sandbox reads a request only after its `latency`, and drops it
# if the client is gone by then, so the latency itself stays short.
KILL_SCENARIO = {**EXAMPLES_SCENARIO, "rate_slow": 0.8, "slow_seconds": 0.25}
# What the worker-kill case needs from Airflow: retries for the example's mapped sends (which set
# none), without the default 300 s delay, and a lost task noticed in seconds instead of 5 minutes
# (the supervisor heartbeats every [workers] min_heartbeat_interval, well inside the timeout).
FAST_RETRIES = {
    "AIRFLOW__CORE__DEFAULT_TASK_RETRIES": "1",
    "AIRFLOW__CORE__DEFAULT_TASK_RETRY_DELAY": "1",
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "2",
    "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "2",
}


@pytest.fixture
def redis_url() -> str:
    url = os.environ.get(REDIS_URL_ENV)
    if not url:
        pytest.skip(f"no Redis for this run: set {REDIS_URL_ENV} (.ci/run does) to run the CeleryExecutor test")
    if problem := celery_stack_problem(url):
        pytest.skip(problem)
    return url


class RoundRobinBalancer:
    """Receivers behind a load balancer: each report body goes to the next receiver in turn.

    Keeps what the sandbox reported (each item of every body a receiver took), so that the test can
    count, per x-apiheader and per recipient, the messages the sandbox accepted.
    """

    def __init__(self, backends: list[str]) -> None:
        self.backends = backends
        self.turn = itertools.count()
        self.lock = threading.Lock()
        self.items: list[dict[str, Any]] = []
        self.bodies_per_backend: Counter = Counter()
        balancer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                backend = balancer.backends[next(balancer.turn) % len(balancer.backends)]
                headers = {
                    name: self.headers[name] for name in ("Content-Type", "X-Pepipost-Token") if self.headers[name]
                }
                try:
                    answer = requests.post(backend, data=body, headers=headers, timeout=30)
                    status, content = answer.status_code, answer.content
                except requests.RequestException:
                    status, content = 502, b"bad gateway"
                if status < 300:
                    with balancer.lock:
                        balancer.bodies_per_backend[backend] += 1
                        balancer.items.extend(json.loads(body).get("delivery_status", []))
                self.send_response(status)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/pepipost/webhook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> RoundRobinBalancer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def take(self) -> tuple[list[dict[str, Any]], Counter]:
        """The report items and bodies per receiver since the last call."""
        with self.lock:
            items, per_backend = self.items, self.bodies_per_backend
            self.items, self.bodies_per_backend = [], Counter()
        return items, per_backend


def ledger_rows(store: sqlalchemy.Engine, dag_id: str, run_id: str) -> list[dict[str, Any]]:
    query = sqlalchemy.text(
        "SELECT task_id, map_index, row_index, state, message_id, api_header, recipient, error_code, "
        "reconciled_at IS NOT NULL AS reconciled FROM pepipost_ledger WHERE dag_id = :dag AND run_id = :run"
    )
    with store.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(query, {"dag": dag_id, "run": run_id})]


def stored_events(store: sqlalchemy.Engine) -> int:
    with store.connect() as conn:
        return conn.execute(sqlalchemy.text("SELECT count(*) FROM pepipost_events")).scalar()


def check_exactly_once(
    ledger: list[dict[str, Any]], rows: int, reports: list[dict[str, Any]], stats: dict[str, Any]
) -> Counter:
    """Every input row in the ledger once; every message the sandbox accepted is one row's, and no
    row, x-apiheader or recipient got two. Returns the ledger's states."""
    assert len(ledger) == rows, f"{len(ledger)} ledger rows for {rows} input rows"
    places = Counter((row["task_id"], row["map_index"], row["row_index"]) for row in ledger)
    assert max(places.values()) == 1, [place for place, n in places.items() if n > 1][:5]
    states = Counter(row["state"] for row in ledger)
    assert set(states) <= {"accepted", "rejected", "unknown"}, states
    assert {row["error_code"] for row in ledger if row["state"] == "rejected"} <= {"8003"}, states

    accepted = {row["message_id"]: row for row in ledger if row["state"] == "accepted"}
    assert len(accepted) == states["accepted"], "two accepted rows share a message id"
    # The sandbox's own count of what it accepted: a message sent twice would be one more than the ledger holds.
    assert stats["accepted"] == states["accepted"], (stats, states)
    # Its reports (each accepted message reports 'sent' first) name every message it accepted, with
    # the x-apiheader and recipient it was sent with.
    sent = {item["ncmessage_id"]: item for item in reports if item["status"] == "sent"}
    assert len(sent) == stats["accepted"], f"{len(sent)} messages reported 'sent', {stats['accepted']} accepted"
    assert set(sent) == set(accepted), "the sandbox accepted messages that no ledger row holds"
    per_header = Counter(item["x-apiheader"] for item in sent.values())
    per_recipient = Counter(item["recipient"] for item in sent.values())
    assert max(per_header.values()) == 1, [h for h, n in per_header.items() if n > 1][:5]
    assert max(per_recipient.values()) == 1, [r for r, n in per_recipient.items() if n > 1][:5]
    for message_id, row in accepted.items():
        assert (sent[message_id]["x-apiheader"], sent[message_id]["recipient"]) == (row["api_header"], row["recipient"])
    unknown_headers = {row["api_header"] for row in ledger if row["state"] == "unknown"}
    assert not unknown_headers & set(per_header), "a row left unknown was accepted by the vendor but not reconciled"
    return states


def xcom_value(stack: AirflowStack, dag_id: str, run_id: str, task_id: str, map_index: int, key: str) -> Any:
    query = sqlalchemy.text(
        "SELECT value FROM xcom WHERE dag_id = :dag AND run_id = :run AND task_id = :task "
        "AND map_index = :map AND key = :key"
    )
    params = {"dag": dag_id, "run": run_id, "task": task_id, "map": map_index, "key": key}
    with stack.metadata.connect() as conn:
        value = conn.execute(query, params).scalar()
    return json.loads(value) if isinstance(value, str) else value


def tries_of(stack: AirflowStack, dag_id: str, run_id: str, task_id: str, map_index: int) -> dict[int, str]:
    """try_number -> hostname, from the task instance and its history of earlier tries."""
    query = sqlalchemy.text(
        "SELECT try_number, hostname FROM task_instance_history WHERE dag_id = :dag AND run_id = :run "
        "AND task_id = :task AND map_index = :map UNION SELECT try_number, hostname FROM task_instance "
        "WHERE dag_id = :dag AND run_id = :run AND task_id = :task AND map_index = :map"
    )
    params = {"dag": dag_id, "run": run_id, "task": task_id, "map": map_index}
    with stack.metadata.connect() as conn:
        return dict(conn.execute(query, params).all())


def test_campaigns_run_across_two_celery_workers_and_survive_a_killed_worker(tmp_path, fresh_database, redis_url):
    store_url = fresh_database()
    store = sqlalchemy.create_engine(store_url)
    queue = f"pepipost-{uuid.uuid4().hex[:8]}"  # this test's tasks only, whatever else shares the broker
    sandbox = Sandbox()
    env = {
        "AIRFLOW__CELERY__BROKER_URL": redis_url,
        "AIRFLOW__OPERATORS__DEFAULT_QUEUE": queue,
        "AIRFLOW_CONN_PEPIPOST_DEFAULT": connection_json(sandbox.url),
        "PEPIPOST_WEBHOOK_TOKEN": TOKEN,
        **store_env(store_url),
        **FAST_RETRIES,
    }
    stack = AirflowStack(tmp_path, fresh_database(), env, executor="CeleryExecutor")
    evidence: dict[str, Any] = {}
    try:
        receivers = [start_receiver(stack.procs, f"receiver-{n}", free_port()) for n in (1, 2)]
        with RoundRobinBalancer(receivers) as balancer:
            sandbox.start(stack.procs, balancer.url, EXAMPLES_SCENARIO)
            stack.start([MAPPED, TEMPLATE])
            for worker in WORKERS:
                stack.start_celery_worker(worker, queue, concurrency=2)

            # 1. Both examples by hand; the mapped sends spread over both workers.
            mapped_run = stack.trigger(MAPPED, "celery-mapped", {"segments": SEGMENTS, "per_segment": PER_SEGMENT})
            template_run = stack.trigger(TEMPLATE, "celery-template")
            stack.wait_for_runs([MAPPED, TEMPLATE], 1)
            sends = [ti for ti in stack.task_instances(MAPPED, mapped_run) if ti["task_id"] == "send_segment"]
            assert len(sends) == SEGMENTS and all(ti["try_number"] == 1 for ti in sends), sends
            assert {ti["hostname"] for ti in sends} == set(WORKERS), sends
            evidence["mapped sends per worker"] = dict(Counter(ti["hostname"] for ti in sends))
            template_sends = [
                ti for ti in stack.task_instances(TEMPLATE, template_run) if ti["task_id"] == "send_invoices"
            ]
            assert [ti["try_number"] for ti in template_sends] == [1], template_sends

            stats = sandbox.drain()
            reports, per_receiver = balancer.take()
            assert len(per_receiver) == 2, f"the reports were not split between the receivers: {per_receiver}"
            assert stats["reports"]["events_lost"] == 0, stats
            ledger = ledger_rows(store, MAPPED, mapped_run) + ledger_rows(store, TEMPLATE, template_run)
            states = check_exactly_once(ledger, SEGMENTS * PER_SEGMENT + 60, reports, stats)
            assert states["unknown"] == 0, states
            # The sensors succeeded (the runs did) and the store holds every report the sandbox posted.
            assert stored_events(store) == stats["reports"]["events_posted"] == len(reports), stats
            events_before = stored_events(store)
            evidence["round 1"] = {"rows": len(ledger), "states": dict(states), "reports": len(reports)}

            # 2. A worker killed in the middle of a mapped send; Airflow retries it on the other.
            sandbox.stop()
            sandbox.start(stack.procs, balancer.url, KILL_SCENARIO)
            kill_run = stack.trigger(
                MAPPED, "celery-kill", {"segments": KILL_SEGMENTS, "per_segment": KILL_PER_SEGMENT}
            )

            def running_sends() -> dict[int, str]:
                """map index -> the worker running it."""
                return {
                    ti["map_index"]: ti["hostname"]
                    for ti in stack.task_instances(MAPPED, kill_run)
                    if ti["task_id"] == "send_segment" and ti["state"] == "running" and ti["hostname"] in WORKERS
                }

            def segment_states() -> dict[int, Counter]:
                states: dict[int, Counter] = defaultdict(Counter)
                for row in ledger_rows(store, MAPPED, kill_run):
                    states[row["map_index"]][row["state"]] += 1
                    states[row["map_index"]]["reconciled from reports"] += row["reconciled"]
                return states

            victim: list[str] = []

            def caught_mid_send() -> bool:
                progress = segment_states()
                victim[:] = [
                    worker
                    for index, worker in running_sends().items()
                    if 40 <= progress[index]["accepted"] <= KILL_PER_SEGMENT - 80
                ][:1]
                return bool(victim)

            stack.wait(caught_mid_send, 120, "no mapped send was caught mid-way")
            killed = sorted(index for index, worker in running_sends().items() if worker == victim[0])
            assert killed, "the send caught mid-way finished before the kill"
            processes = stack.procs.kill_tree(victim[0])
            at_kill = segment_states()
            evidence["kill"] = {"worker": victim[0], "processes": processes, "segments": {}}

            stack.wait_for_runs([MAPPED], 2)
            survivor = next(worker for worker in WORKERS if worker != victim[0])
            for index in killed:
                tries = tries_of(stack, MAPPED, kill_run, "send_segment", index)
                assert tries == {1: victim[0], 2: survivor}, tries
                summary = xcom_value(stack, MAPPED, kill_run, "send_segment", index, "send_summary")
                assert summary["reused_from_earlier_try"] >= at_kill[index]["accepted"], (summary, at_kill[index])
                evidence["kill"]["segments"][index] = {"ledger at kill": dict(at_kill[index]), "retry": summary}

            stats = sandbox.drain()
            for index, states in segment_states().items():
                if index in killed:
                    evidence["kill"]["segments"][index]["ledger at the end"] = dict(states)
                    # The answers the kill cut off: accepted all the same, and matched by their reports.
                    assert states["reconciled from reports"] > 0, evidence
            reports, _ = balancer.take()
            ledger = ledger_rows(store, MAPPED, kill_run)
            states = check_exactly_once(ledger, KILL_SEGMENTS * KILL_PER_SEGMENT, reports, stats)
            assert stored_events(store) - events_before == stats["reports"]["events_posted"] == len(reports), stats
            evidence["round 2"] = {"rows": len(ledger), "states": dict(states), "sandbox accepted": stats["accepted"]}
            stack.procs.alive()
            print(f"\n[celery] {json.dumps(evidence, default=str)}")
    except StackFailure:
        print(f"\n[celery] evidence so far: {json.dumps(evidence, default=str)}")
        raise
    finally:
        stack.stop()
        store.dispose()
        forget_celery_queue(redis_url, queue)

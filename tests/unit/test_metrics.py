"""What the tasks report to Airflow's Stats: counts as they grow, each row once, however often asked."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

import pytest

from airflow_provider_pepipost import metrics
from airflow_provider_pepipost.metrics import SEND_STATES, SendCounters, delivery_verdict, task_tags
from airflow_provider_pepipost.operators.campaign import PROGRESS_STATES


class RecordingStats:
    """Airflow's Stats as the provider calls it (the system test sends them through real StatsD)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, object, dict]] = []

    def incr(self, stat: str, count: int = 1, rate: float = 1, *, tags: dict | None = None) -> None:
        self.calls.append(("incr", stat, count, tags or {}))

    def timing(self, stat: str, dt: timedelta, *, tags: dict | None = None) -> None:
        self.calls.append(("timing", stat, dt, tags or {}))


@pytest.fixture
def stats(monkeypatch) -> RecordingStats:
    recording = RecordingStats()
    monkeypatch.setattr(metrics, "Stats", recording)
    return recording


def test_counts_are_reported_as_they_grow_and_add_up_to_the_last(stats):
    tags = task_tags("campaign", "send")
    counters = SendCounters(tags)
    counters.report(Counter(accepted=3))
    counters.report(Counter(accepted=3, rejected=1))
    counters.report(Counter(accepted=10, rejected=1, fallback=2))
    counters.report(Counter(accepted=10, rejected=1, fallback=2))  # the end, after the last progress line
    totals = Counter()
    for kind, stat, count, given in stats.calls:
        assert (kind, given) == ("incr", tags) and count > 0
        totals[stat] += count
    assert totals == {"pepipost.send.accepted": 10, "pepipost.send.rejected": 1, "pepipost.send.fallback": 2}
    assert len(stats.calls) == 4  # nothing is sent for a count that did not move


def test_every_state_a_row_can_end_in_has_its_counter():
    assert set(SEND_STATES) == {state for state, _ in PROGRESS_STATES}


def test_the_sensor_times_a_reached_target_and_counts_a_missed_one(stats):
    tags = task_tags("campaign", "wait")
    delivery_verdict("delivered", True, 42.5, tags)
    delivery_verdict("read", False, None, tags)
    assert stats.calls == [
        ("incr", "pepipost.delivery.reached", 1, tags),
        ("timing", "pepipost.delivery.time_to_delivered", timedelta(seconds=42.5), tags),
        ("incr", "pepipost.delivery.not_reached", 1, tags),
    ]


def test_a_retry_counts_only_the_rows_it_settled_itself(stats, sqlite_url):
    """Rows an earlier try sent are reused, not sent again: counting them again would double them."""
    from airflow_provider_pepipost.operators.campaign import CampaignSender
    from airflow_provider_pepipost.status.ledger import TaskKey
    from airflow_provider_pepipost.status.store import StatusStore
    from tests.faults.test_campaign_truth import StandInVendor, _message

    store = StatusStore(sqlite_url)
    numbers = [f"9198{i:08d}" for i in range(4)]
    vendor = StandInVendor(dict(zip(numbers, ["accepted", "accepted", "rejected", "unknown"], strict=True)))
    task = TaskKey("metrics", "run-1", "send")
    tags = task_tags(task.dag_id, task.task_id)
    for _ in range(2):  # the first try, then a retry of the same task
        sender = CampaignSender(
            vendor, store, task, total=4, max_rejected_ratio=1.0, max_workers=1, on_progress=SendCounters(tags).report
        )
        result = sender.run([(row, _message(number)) for row, number in enumerate(numbers)])
        assert result.summary()["accepted"] == 2
    totals = Counter()
    for _, stat, count, _ in stats.calls:
        totals[stat] += count
    # The refused row is tried again by the retry (a new send, refused again); the rest are reused.
    assert totals == {"pepipost.send.accepted": 2, "pepipost.send.rejected": 2, "pepipost.send.unknown": 1}


class FailingStats(RecordingStats):
    def incr(self, *args, **kwargs) -> None:
        raise RuntimeError("the metrics backend failed")

    timing = incr


def test_a_failing_metrics_backend_never_stops_or_fails_a_campaign(monkeypatch, sqlite_url, caplog):
    from airflow_provider_pepipost.operators.campaign import CampaignSender
    from airflow_provider_pepipost.status.ledger import TaskKey
    from airflow_provider_pepipost.status.store import StatusStore
    from tests.faults.test_campaign_truth import StandInVendor, _message

    monkeypatch.setattr(metrics, "Stats", FailingStats())
    numbers = [f"9198{i:08d}" for i in range(50)]
    vendor = StandInVendor(dict.fromkeys(numbers, "accepted"))
    sender = CampaignSender(
        vendor, StatusStore(sqlite_url), TaskKey("m", "r", "s"), total=50, max_workers=2, progress_interval=0.0,
        on_progress=SendCounters(task_tags("m", "s")).report,
    )  # fmt: skip
    assert sender.run([(row, _message(number)) for row, number in enumerate(numbers)]).summary()["accepted"] == 50
    delivery_verdict("delivered", True, 1.0, task_tags("m", "wait"))  # the sensor's: nothing raised either
    assert "Airflow metrics: report failed and was skipped: RuntimeError" in caplog.text

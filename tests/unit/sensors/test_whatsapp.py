"""WhatsAppMessageStatusSensor on a real store: what it says when it cannot decide, and bad input."""

from __future__ import annotations

import time

import pytest
from airflow.models.trigger import TriggerFailureReason  # what the scheduler resumes a failed deferral with

from airflow_provider_pepipost.sensors.whatsapp import WhatsAppMessageStatusSensor
from airflow_provider_pepipost.status.model import DeliveryEvent
from airflow_provider_pepipost.status.store import StatusStore
from airflow_provider_pepipost.version_compat import AirflowFailException, AirflowSensorTimeout, AirflowSkipException


def sensor(conn_id: str, message_ids) -> WhatsAppMessageStatusSensor:
    return WhatsAppMessageStatusSensor(
        task_id="wait", message_ids=message_ids, status_store_conn_id=conn_id, timeout=60
    )


def report(message_id: str, status: str = "sent") -> DeliveryEvent:
    return DeliveryEvent(message_id, status, status, time.time(), "", None, None, "{}")


def test_an_empty_id_list_fails_instead_of_passing_on_nothing(use_store, sqlite_url):
    with pytest.raises(AirflowFailException, match="nothing to wait for"):
        sensor(use_store(sqlite_url), []).poke({})


def test_a_timeout_with_no_report_ever_points_at_the_receiver_and_its_token(use_store, sqlite_url):
    message = sensor(use_store(sqlite_url), ["m1", "m2"]).timeout_message()
    assert "2 pending" in message
    assert "never received a delivery report" in message
    assert "PEPIPOST_WEBHOOK_TOKEN" in message and "/pepipost/status" in message


def test_a_timeout_says_when_reports_last_came(use_store, sqlite_url):
    store = StatusStore(sqlite_url)
    store.ingest([report("other")])
    message = sensor(use_store(sqlite_url), ["m1"]).timeout_message()
    assert "No report for these messages has arrived" in message and "UTC" in message

    store.ingest([report("m1")])
    message = sensor(use_store(sqlite_url), ["m1", "m2"]).timeout_message()
    assert "The last delivery report for these messages arrived at" in message


# -- the verdict metric whichever way the wait ends ------------------------------------------------


@pytest.fixture
def verdicts(monkeypatch) -> list[str]:
    """The delivery verdicts the sensor reports to Airflow's Stats: 'reached' or 'not_reached'."""
    from airflow_provider_pepipost import metrics

    seen: list[str] = []

    class Recording:
        def incr(self, stat: str, count: int = 1, rate: float = 1, *, tags=None) -> None:
            seen.append(stat.rpartition(".")[2])

        def timing(self, stat: str, dt, *, tags=None) -> None:
            pass

    monkeypatch.setattr(metrics, "Stats", Recording())
    return seen


def test_a_timeout_turned_into_a_skip_still_counts_as_not_reached(use_store, sqlite_url, verdicts, capsys):
    waiting = WhatsAppMessageStatusSensor(
        task_id="wait", message_ids=["m1"], status_store_conn_id=use_store(sqlite_url), timeout=0.2,
        poke_interval=0.05, mode="poke", soft_fail=True,
    )  # fmt: skip
    with pytest.raises(AirflowSkipException):
        waiting.execute({})
    assert verdicts == ["not_reached"]
    logged = capsys.readouterr().out
    assert "Skipped: timed out after 0.2s: 1 pending" in logged  # the sensor's own words, not only Airflow's


@pytest.mark.parametrize("skip_setting", ["soft_fail", "never_fail"])
def test_too_many_failures_turned_into_a_skip_count_as_not_reached_and_say_why(
    skip_setting, use_store, sqlite_url, verdicts, capsys
):
    StatusStore(sqlite_url).ingest([report("m1", "failed")])
    waiting = WhatsAppMessageStatusSensor(
        task_id="wait", message_ids=["m1"], status_store_conn_id=use_store(sqlite_url), timeout=5,
        **{skip_setting: True},
    )  # fmt: skip
    with pytest.raises(AirflowSkipException):
        waiting.execute({})
    assert verdicts == ["not_reached"]
    logged = capsys.readouterr().out
    assert "Skipped:" in logged and "failed" in logged.partition("Skipped:")[2]


@pytest.mark.parametrize(("soft_fail", "raised"), [(False, AirflowSensorTimeout), (True, AirflowSkipException)])
def test_airflows_own_deferral_timeout_counts_as_not_reached(soft_fail, raised, use_store, sqlite_url, verdicts):
    """Airflow's timeout of the deferral can come before the trigger's deadline: then no event reaches
    execute_complete, and the task is resumed only to fail."""
    waiting = WhatsAppMessageStatusSensor(
        task_id="wait", message_ids=["m1"], status_store_conn_id=use_store(sqlite_url), timeout=5,
        deferrable=True, soft_fail=soft_fail,
    )  # fmt: skip
    with pytest.raises(raised):
        waiting.resume_execution("__fail__", {"error": TriggerFailureReason.TRIGGER_TIMEOUT}, {})
    assert verdicts == ["not_reached"]


def test_the_triggers_own_timeout_is_counted_once(use_store, sqlite_url, verdicts):
    waiting = WhatsAppMessageStatusSensor(
        task_id="wait", message_ids=["m1"], status_store_conn_id=use_store(sqlite_url), timeout=5, deferrable=True
    )
    summary = {"total": 1, "counts": {}, "pending": 1, "unknown": 0}
    with pytest.raises(AirflowSensorTimeout):
        waiting.resume_execution("execute_complete", {"event": {"status": "timeout", "summary": summary}}, {})
    assert verdicts == ["not_reached"]


def test_a_skip_of_anything_else_is_no_verdict_and_stays_a_skip(verdicts, use_store, sqlite_url):
    """never_fail skips any error of a poke: a store that cannot be read is no delivery verdict, and
    explaining the timeout (which reads the store) must not turn the skip back into that error."""
    waiting = WhatsAppMessageStatusSensor(
        task_id="wait", message_ids=["m1"], status_store_conn_id="no_such_store", timeout=5, never_fail=True
    )
    with pytest.raises(AirflowSkipException):
        waiting.execute({})
    empty = WhatsAppMessageStatusSensor(  # nothing to wait for: a bad argument, skipped under soft_fail
        task_id="wait", message_ids=[], status_store_conn_id=use_store(sqlite_url), timeout=5, soft_fail=True
    )
    with pytest.raises(AirflowSkipException):
        empty.execute({})
    assert verdicts == []


def test_a_failed_trigger_is_no_verdict_and_soft_fail_still_skips_it(verdicts):
    waiting = WhatsAppMessageStatusSensor(
        task_id="wait", message_ids=["m1"], status_store_conn_id="no_such_store", timeout=5,
        deferrable=True, soft_fail=True,
    )  # fmt: skip
    with pytest.raises(AirflowSkipException):
        waiting.resume_execution("__fail__", {"error": TriggerFailureReason.TRIGGER_FAILURE}, {})
    assert verdicts == []


def test_a_timeout_is_still_a_timeout_when_the_store_cannot_be_read_to_explain_it(verdicts):
    waiting = WhatsAppMessageStatusSensor(
        task_id="wait", message_ids=["m1"], status_store_conn_id="no_such_store", timeout=5, deferrable=True
    )
    with pytest.raises(AirflowSensorTimeout, match=r"timed out after 5s \(the status store could not be read"):
        waiting.resume_execution("__fail__", {"error": TriggerFailureReason.TRIGGER_TIMEOUT}, {})
    assert verdicts == ["not_reached"]

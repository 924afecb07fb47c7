"""The sensor's verdict on a summary, for each failure and unknown-outcome policy."""

from __future__ import annotations

import pytest

from airflow_provider_pepipost.status.model import DeliverySummary, evaluate, normalize_status


def summary(total=10, pending=0, unknown=0, **counts) -> DeliverySummary:
    failed = counts.get("failed", 0)
    return DeliverySummary(
        total=total,
        counts=counts,
        pending=pending,
        unknown=unknown,
        failed=[{"message_id": f"f{i}", "remark": "r"} for i in range(failed)],
        failed_total=failed,
    )


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("READ", "read"),
        (" Delivered ", "delivered"),
        ("Failure", "failed"),
        ("undelivered", "failed"),
        ("queued", "queued"),
    ],
)
def test_status_spellings(raw, expected):
    assert normalize_status(raw) == expected


def test_read_counts_as_delivered_and_failed_does_not():
    s = summary(read=4, delivered=3, sent=1, failed=2)
    assert (s.reached("sent"), s.reached("delivered"), s.reached("read")) == (8, 7, 4)


def test_success_when_the_ratio_is_met():
    assert evaluate(summary(read=9, pending=1), "delivered", 0.9).done
    assert not evaluate(summary(read=8, pending=2), "delivered", 0.9).done


def test_ratio_rounds_up_without_float_noise():
    assert evaluate(summary(total=10, delivered=9, pending=1), "delivered", 0.9).done
    assert not evaluate(summary(total=3, delivered=2, pending=1), "delivered", 0.9).done


def test_unreachable_fails_only_when_the_ratio_cannot_be_met():
    waiting = evaluate(summary(failed=1, pending=9), "delivered", 0.9)
    assert not waiting.done
    failed = evaluate(summary(failed=2, pending=8), "delivered", 0.9)
    assert failed.done and failed.failed and "f0 (r)" in failed.reason


def test_any_fails_at_the_first_failure_and_never_waits():
    assert evaluate(summary(failed=1, read=9), "delivered", 0.5, fail_on="any").failed
    verdict = evaluate(summary(failed=10), "delivered", 1.0, fail_on="never")
    assert not verdict.done


def test_unknown_policies():
    s = summary(total=10, read=9, unknown=1)
    assert not evaluate(s, "read", 1.0, unknown_policy="wait").done
    assert evaluate(s, "read", 1.0, unknown_policy="ignore").done
    verdict = evaluate(s, "read", 1.0, unknown_policy="fail")
    assert verdict.failed and "unknown send outcome" in verdict.reason


def test_nothing_to_wait_for_succeeds():
    assert evaluate(summary(total=0), "read", 1.0).done


def test_summary_round_trips_through_xcom_form():
    s = summary(read=2, failed=1, pending=7)
    assert DeliverySummary.from_dict(s.to_dict()) == s

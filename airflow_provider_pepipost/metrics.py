"""What the send operators and the delivery sensor report to Airflow's own metrics.

They go through Airflow's ``Stats``, so they reach StatsD or OpenTelemetry as Airflow's metrics do
(``[metrics] statsd_on`` / ``otel_on``), under Airflow's prefix (``airflow.`` by default), and go
nowhere when both are off. Names carry no DAG or task (StatsD without tags would make one series
per task); the tags ``dag_id`` and ``task_id`` name them where the backend keeps tags.

- ``pepipost.send.<state>``: rows that ended in ``state`` (``accepted``, ``fallback``, ``rejected``,
  ``unknown``, ``duplicate``, ``not_sent``, ``suppressed``), counted as the campaign goes, by the try
  that settled them: a retry does not count again the rows an earlier try settled.
- ``pepipost.send.duration``: a send task's campaign, from its first row to its last outcome.
- ``pepipost.delivery.time_to_<target>``: how long the sensor waited until the target status
  (``sent``, ``delivered`` or ``read``) was reached, from its first poke.
- ``pepipost.delivery.reached`` / ``pepipost.delivery.not_reached``: the sensor's verdicts.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

try:
    from airflow.sdk.observability.stats import Stats
except ImportError:  # Airflow 3.1: Stats lived in core
    from airflow.stats import Stats  # type: ignore[no-redef,unused-ignore]

SEND_STATES = ("accepted", "fallback", "rejected", "unknown", "duplicate", "not_sent", "suppressed")

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., None])


def never_raises(emit: F) -> F:
    """Metrics are for watching: a backend that fails (a custom stat_name_handler, a client of the
    user's own) is logged, and never stops or fails the campaign it was counting."""

    @functools.wraps(emit)
    def guarded(*args: Any, **kwargs: Any) -> None:
        try:
            emit(*args, **kwargs)
        except Exception as err:
            log.warning("Airflow metrics: %s failed and was skipped: %s", emit.__name__, type(err).__name__)

    return guarded  # type: ignore[return-value]


def task_tags(dag_id: str, task_id: str) -> dict[str, str]:
    return {"dag_id": dag_id, "task_id": task_id}


class SendCounters:
    """A campaign's row counts, reported as they grow: each call sends only what is new since the
    last one, so a task killed midway has reported what it did and a repeated call adds nothing."""

    def __init__(self, tags: dict[str, str]) -> None:
        self.tags = tags
        self._reported: Counter = Counter()

    @never_raises
    def report(self, counts: Counter) -> None:
        for state in SEND_STATES:
            new = counts[state] - self._reported[state]
            if new > 0:
                Stats.incr(f"pepipost.send.{state}", new, tags=self.tags)
                self._reported[state] = counts[state]


@never_raises
def send_duration(seconds: float, tags: dict[str, str]) -> None:
    Stats.timing("pepipost.send.duration", timedelta(seconds=seconds), tags=tags)


@never_raises
def delivery_verdict(target_status: str, reached: bool, waited_seconds: float | None, tags: dict[str, Any]) -> None:
    """The sensor's verdict, and how long it waited when the target was reached."""
    Stats.incr("pepipost.delivery.reached" if reached else "pepipost.delivery.not_reached", tags=tags)
    if reached and waited_seconds is not None:
        Stats.timing(f"pepipost.delivery.time_to_{target_status}", timedelta(seconds=waited_seconds), tags=tags)

"""The receiver's Prometheus metrics: what it stored, what it refused, how full its queue is, how long a commit takes.

Served at ``GET {prefix}/metrics`` behind the same token as ``/status``. Each receiver app keeps its
own registry, so two apps in one process (tests, the plugin beside a standalone app) never share
counts. With several worker processes (``pepipost-webhook --workers N``) the counts live in
``PROMETHEUS_MULTIPROC_DIR`` and any worker's scrape answers for all of them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess as prometheus_multiprocess
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from airflow_provider_pepipost.status.ingest import IngestResult

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST

# Why a request was refused: one label value per check, never the request's own text (a label
# taken from the request would let a client grow the scrape without bound).
REFUSAL_REASONS = (
    "not_configured",  # 503: no token set
    "source_not_allowed",  # 403
    "bad_token",  # 401
    "not_json",  # 415
    "body_timeout",  # 408
    "too_large",  # 413
    "busy",  # 503: the ingest queue is full
    "unreadable",  # 400: not JSON, or no report in it
)
# From a one-event commit on SQLite (a few ms) to a store that stalls.
INGEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ReceiverMetrics:
    """The receiver's counters, gauges and histogram, on a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.multiprocess = bool(os.environ.get(MULTIPROC_DIR_ENV))
        registry = self.registry
        self.reports = Counter(
            "pepipost_receiver_reports",
            "Delivery-report events committed to the status store, by result (accepted: new; duplicate: seen before).",
            ["result"],
            registry=registry,
        )
        self.replies = Counter(
            "pepipost_receiver_replies", "Customer messages (replies, taps) committed to the store.", registry=registry
        )
        self.opt_outs = Counter(
            "pepipost_receiver_opt_outs", "Senders put on the suppression list by a stop word.", registry=registry
        )
        self.reconciled = Counter(
            "pepipost_receiver_reconciled",
            "Sends of unknown outcome matched to their message id by a report.",
            registry=registry,
        )
        self.dead_letters = Counter(
            "pepipost_receiver_dead_letters",
            "Items kept as dead letters (could not be read as a report).",
            registry=registry,
        )
        self.refusals = Counter(
            "pepipost_receiver_refusals", "Requests refused, by reason.", ["reason"], registry=registry
        )
        self.store_errors = Counter(
            "pepipost_receiver_store_errors",
            "Bodies the store could not commit (answered 503: the vendor sends them again).",
            registry=registry,
        )
        self.ingest_seconds = Histogram(
            "pepipost_receiver_ingest_seconds",
            "From a body read to its events committed: the wait in the queue and the write.",
            buckets=INGEST_BUCKETS,
            registry=registry,
        )
        self.queued_bodies = Gauge(
            "pepipost_receiver_queued_bodies",
            "Bodies admitted and not yet answered.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.queued_bytes = Gauge(
            "pepipost_receiver_queued_bytes",
            "Bytes of the bodies admitted and not yet answered.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        for reason in REFUSAL_REASONS:  # every reason shows, at 0, from the first scrape
            self.refusals.labels(reason)
        # The children every body counts in, looked up once (labels() takes a lock and a look-up).
        self._accepted, self._duplicates = self.reports.labels("accepted"), self.reports.labels("duplicate")

    def stored(self, result: IngestResult, seconds: float) -> None:
        """One body committed: its counts, and how long the commit took."""
        if result.accepted:
            self._accepted.inc(result.accepted)
        if result.duplicates:
            self._duplicates.inc(result.duplicates)
        if result.inbound:
            self.replies.inc(result.inbound)
        if result.opt_outs:
            self.opt_outs.inc(result.opt_outs)
        if result.reconciled:
            self.reconciled.inc(result.reconciled)
        if result.dead_letters:
            self.dead_letters.inc(result.dead_letters)
        self.ingest_seconds.observe(seconds)

    def follow_queue(self, bodies: Callable[[], float], size: Callable[[], float]) -> bool:
        """The queue gauges read at each scrape from these functions, rather than set for every body
        (two gauges set twice a body cost about 1.3 us of its 60). True when they are; False with
        several worker processes, where a scrape reads every worker's files instead: there the caller
        sets them (``queue_now``)."""
        if self.multiprocess:
            return False
        self.queued_bodies.set_function(bodies)
        self.queued_bytes.set_function(size)
        return True

    def queue_now(self, bodies: int, size: int) -> None:
        self.queued_bodies.set(bodies)
        self.queued_bytes.set(size)

    def refused(self, reason: str) -> None:
        self.refusals.labels(reason).inc()

    def exposition(self) -> bytes:
        """The scrape's body, in Prometheus' text format."""
        if not self.multiprocess:
            return generate_latest(self.registry)
        # Every worker's files, summed: a fresh registry per scrape, as prometheus_client asks. A
        # worker that died (and was restarted) leaves its queue gauges behind: they are dropped.
        _forget_dead_workers(os.environ[MULTIPROC_DIR_ENV])
        merged = CollectorRegistry()
        prometheus_multiprocess.MultiProcessCollector(merged)
        return generate_latest(merged)


def _forget_dead_workers(folder: str) -> None:
    for path in Path(folder).glob("gauge_live*_*.db"):
        pid = path.stem.rsplit("_", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            prometheus_multiprocess.mark_process_dead(int(pid), folder)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True

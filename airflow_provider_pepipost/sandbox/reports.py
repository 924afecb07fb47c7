"""The sandbox's delivery-report sender: posts delivery_status[] batches to a webhook, as the vendor does.

Written from docs/pepipost/api-notes.md on its own, sharing no code with the receiver, so
that a bug in either one shows up as a disagreement between the two.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import requests

from airflow_provider_pepipost.sandbox.scenario import FAILED_REMARKS, Scenario

log = logging.getLogger(__name__)

POST_TRIES = 5


@dataclass
class AcceptedMessage:
    message_id: str
    recipient: str
    source: str
    api_header: str | None
    accepted_at: float
    draw_key: str  # Scenario.draw_key: the statuses it reaches follow from it
    kind: str = "media"  # media (a session message) or template
    template: str | None = None  # a template message's name: its quick-reply buttons follow from it


class ReportSender:
    """A thread that posts each accepted message's statuses when they fall due, in batches."""

    def __init__(self, scenario: Scenario, webhook_url: str | None, headers: dict[str, str] | None = None) -> None:
        self.scenario = scenario
        self.webhook_url = webhook_url
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self._queue: list[tuple[float, int, str, dict[str, Any]]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._session = requests.Session()
        self.events_posted = 0
        self.batches_posted = 0
        self.batches_failed = 0
        self.events_lost = 0
        self.taps_queued = 0  # button items queued: the scenario's taps and those made by hand

    def start(self) -> None:
        if self.webhook_url and self._thread is None:
            self._thread = threading.Thread(
                target=self._run, args=(self.webhook_url,), name="pepipost-sandbox-reports", daemon=True
            )
            self._thread.start()

    def stop(self, drain_seconds: float = 0.0) -> None:
        deadline = time.monotonic() + drain_seconds
        while drain_seconds and self.pending() and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread:
            self._thread.join(timeout=10)
        self._session.close()

    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def schedule(self, message: AcceptedMessage) -> None:
        """Queue the reports of one accepted message."""
        if not self.webhook_url:
            return
        sc = self.scenario
        identity = message.draw_key
        path = sc.status_path(identity)
        times = [message.accepted_at + sc.status_delay * (i + 1) for i in range(len(path))]
        if len(path) == 3 and sc.draw("order", identity) < sc.out_of_order_ratio:
            times[1], times[2] = times[2], times[1]
        items = []
        for status, due in zip(path, times, strict=True):
            items.append((due, "delivery_status", self._delivery_item(message, status, due)))
            if sc.draw("dup", identity, status) < sc.duplicate_ratio:
                items.append((due + sc.status_delay, "delivery_status", self._delivery_item(message, status, due)))
        last = max(times)  # out of order, 'delivered' is the last one posted
        if (answer := self._customer_answer(message, last)) is not None:
            items.append((last, "incoming_message", answer))
        with self._cond:
            for due, kind, item in items:
                heapq.heappush(self._queue, (due, next(self._seq), kind, item))
            self.taps_queued += sum(1 for _, _, item in items if item.get("message_type") == "button")
            self._cond.notify()

    def _customer_answer(self, message: AcceptedMessage, when: float) -> dict[str, Any] | None:
        """What the recipient sends back after the last status, if anything: a STOP reply first,
        else a tap on one of the template's quick-reply buttons, else a text reply."""
        sc, identity, reply_id = self.scenario, message.draw_key, f"in-{message.message_id}"
        if sc.draw("stop", identity) < sc.stop_reply_ratio:
            return reply_item(reply_id, message.recipient, sc.stop_reply_text, when, message.message_id)
        if (button := sc.button_tap(identity, message.template)) is not None:
            return button_item(reply_id, message.recipient, button, when, message.message_id)
        if sc.draw("inbound", identity) < sc.inbound_ratio:
            return reply_item(reply_id, message.recipient, "Thanks!", when, message.message_id)
        return None

    def _delivery_item(self, message: AcceptedMessage, status: str, when: float) -> dict[str, Any]:
        remark = ""
        if status == "failed":
            remark = FAILED_REMARKS[int(self.scenario.draw("remark", message.draw_key) * len(FAILED_REMARKS))]
            remark = remark.format(recipient=message.recipient)
        item: dict[str, Any] = {
            "ncmessage_id": message.message_id,
            "recipient": message.recipient,
            "status": status,
            "status_remark": remark,
            "source": message.source,
        }
        if self.scenario.webhook_version == 1:
            item["received_at"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(when))
        else:
            item["received_at"] = str(int(when))
            item["x-apiheader"] = message.api_header or ""
            item["phoneNumber"] = "919000000000"
            # A template opens a paid marketing conversation; a session message is a free service one.
            paid = message.kind == "template"
            category = "marketing" if paid else "service"
            item["pricing"] = {"billable": paid, "category": category, "pricing_model": "CBP", "type": "regular"}
        return item

    def reply(self, recipient: str, text: str, context_message_id: str | None = None) -> dict[str, Any]:
        """Queue a text reply from ``recipient``, posted at once (``POST /_sandbox/reply``). Returns the item."""
        now = time.time()
        return self._queue_now(reply_item(f"in-{uuid.uuid4().hex[:16]}", recipient, text, now, context_message_id))

    def tap(self, recipient: str, button: dict[str, str], context_message_id: str | None = None) -> dict[str, Any]:
        """Queue a tap on a quick-reply button ``{"payload", "text"}`` from ``recipient``, posted at
        once (``POST /_sandbox/reply`` and ``/_sandbox/tap``). Returns the item."""
        now = time.time()
        return self._queue_now(button_item(f"in-{uuid.uuid4().hex[:16]}", recipient, button, now, context_message_id))

    def _queue_now(self, item: dict[str, Any]) -> dict[str, Any]:
        with self._cond:
            heapq.heappush(self._queue, (time.time(), next(self._seq), "incoming_message", item))
            if item["message_type"] == "button":
                self.taps_queued += 1
            self._cond.notify()
        return item

    def _take_due(self) -> list[tuple[str, dict[str, Any]]] | None:
        with self._cond:
            while True:
                if self._stopping:
                    return None
                now = time.time()
                if self._queue and self._queue[0][0] <= now:
                    batch: list[tuple[str, dict[str, Any]]] = []
                    while self._queue and self._queue[0][0] <= now and len(batch) < self.scenario.batch_size:
                        _, _, kind, item = heapq.heappop(self._queue)
                        batch.append((kind, item))
                    return batch
                wait = self._queue[0][0] - now if self._queue else 1.0
                self._cond.wait(timeout=max(self.scenario.batch_interval, min(wait, 1.0)))

    def _run(self, url: str) -> None:
        while (batch := self._take_due()) is not None:
            body: dict[str, list[dict[str, Any]]] = {}
            for kind, item in batch:
                body.setdefault(kind, []).append(item)
            self._post(url, body, len(batch))

    def _post(self, url: str, body: dict[str, Any], count: int) -> None:
        for attempt in range(POST_TRIES):
            try:
                response = self._session.post(url, json=body, headers=self.headers, timeout=10)
                if response.status_code < 300:
                    self.events_posted += count
                    self.batches_posted += 1
                    return
                log.warning("webhook answered %s: %s", response.status_code, response.text[:200])
                if 400 <= response.status_code < 500 and response.status_code != 429:
                    break  # the receiver will not take it however often we try
            except requests.RequestException as err:
                log.warning("webhook post failed (%s)", type(err).__name__)
            time.sleep(min(0.1 * 2**attempt, 2.0))
        self.batches_failed += 1
        self.events_lost += count


def reply_item(
    reply_id: str, recipient: str, text: str, when: float, context_message_id: str | None = None
) -> dict[str, Any]:
    """An ``incoming_message[]`` item as the vendor's "Incoming message - text" page shows it."""
    return _incoming(reply_id, recipient, when, context_message_id, "text", {"text": text})


def button_item(
    reply_id: str, recipient: str, button: dict[str, str], when: float, context_message_id: str | None = None
) -> dict[str, Any]:
    """A tap on a quick-reply button, as the vendor posts it since 2024-09-10 (docs/pepipost/api-notes.md,
    "Inbound messages beyond text"): ``message_type`` button, the button's payload and text in ``text_type``."""
    body = {"payload": button["payload"], "text": button["text"]}
    return _incoming(reply_id, recipient, when, context_message_id, "button", body)


def _incoming(
    reply_id: str, recipient: str, when: float, context_message_id: str | None, message_type: str, body: dict[str, Any]
) -> dict[str, Any]:
    """The envelope every ``incoming_message[]`` item shares; ``context`` as the text page shows it."""
    return {
        "message_id": reply_id,
        "from": recipient,
        "received_at": str(int(when)),
        "message_type": message_type,
        "text_type": body,
        "context": {"ncmessage_id": context_message_id, "message_id": None},
    }

"""ClaimWhatsAppRepliesOperator: the first task of a DAG scheduled on replies; it takes the replies
this run is to handle, each reply by one run only.

Airflow delivers a watcher's events to the DAG runs it makes from them, and after a triggerer
restart may deliver one again; Airflow 3.3.2 may also leave events that arrived while a run was
being made to a later run, which only comes with a later event (apache/airflow#56050). So this
operator claims, in the status store, the replies of its run's triggering events and every other
reply the watcher's filters match that no run has claimed yet (the sweep): a run triggered by hand,
or by the DAG's timetable, handles what Airflow left behind.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import Asset, BaseOperator

from airflow_provider_pepipost.reply_filters import ReplyFilter
from airflow_provider_pepipost.status.store import StatusStore, open_store
from airflow_provider_pepipost.triggers.replies import WhatsAppReplyTrigger
from airflow_provider_pepipost.version_compat import AirflowSkipException

if TYPE_CHECKING:
    from airflow.sdk import Context

DEFAULT_SWEEP_WINDOW = 7 * 24 * 3600.0  # seconds back the sweep looks for replies no run claimed
SWEEP_PAGE = 1000  # replies the sweep reads a query
CONSUMER_PREFIX = "consumer:"  # the store's row of where a consumer started (a reply feed's cursor row)


class ClaimWhatsAppRepliesOperator(BaseOperator):
    """Claim the replies this run handles: its triggering events' and, with ``sweep``, the ones
    Airflow left unconsumed. Skips (and so do its downstream tasks) when there is none.

    :param asset: the asset whose ``AssetWatcher`` holds a ``WhatsAppReplyTrigger`` (the DAG is
        scheduled on it); the sweep matches replies with that trigger's filters and store.
    :param consumer: whose claims these are: each reply is handled by one run of the consumer.
        Default: the DAG's id. A new consumer (a renamed DAG) sweeps from its first run's first
        reply, or, when that run was started by hand, from where the watcher's feed started.
    :param sweep: also claim matching replies that no run claimed, received within
        ``sweep_window`` seconds, after the watcher's feed was made and after the consumer's first
        run's replies.
    :param sweep_window: how far back the sweep looks, in seconds (default 7 days).

    Returns (XCom ``return_value``) one row per claimed reply: ``inbound_id``, ``kind`` and
    ``button_payload``; no number and no words. Give them to a send operator as its
    ``recipients``: a row with ``inbound_id`` goes to the number that wrote that reply.
    """

    ui_color = "#25d366"

    def __init__(
        self,
        *,
        asset: Asset,
        consumer: str | None = None,
        sweep: bool = True,
        sweep_window: float = DEFAULT_SWEEP_WINDOW,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        triggers = [w.trigger for w in getattr(asset, "watchers", []) if isinstance(w.trigger, WhatsAppReplyTrigger)]
        if len(triggers) != 1:
            raise ValueError(
                f"asset: {asset!r} must have one AssetWatcher with a WhatsAppReplyTrigger, found {len(triggers)}"
            )
        if sweep_window <= 0:
            raise ValueError(f"sweep_window must be above 0 seconds, not {sweep_window!r}")
        self.asset = asset
        self.watcher_trigger: WhatsAppReplyTrigger = triggers[0]
        self.consumer = consumer
        self.sweep = sweep
        self.sweep_window = sweep_window

    def execute(self, context: Context) -> list[dict[str, Any]]:
        dag_id, run_id = context["dag_run"].dag_id, context["dag_run"].run_id
        consumer = self.consumer or dag_id
        store = open_store(self.watcher_trigger.status_store_conn_id)
        triggered = self._triggering_ids(context)
        feed_start = store.reply_feed_start(self.watcher_trigger.feed_name())
        # A consumer sweeps nothing from before its first run's replies (or, when a person started
        # that run, from before its watcher's feed): a DAG added later to a shared stream never
        # handles replies that came before it.
        first = min(triggered) - 1 if triggered else feed_start
        since = store.open_reply_cursor(f"{CONSUMER_PREFIX}{consumer}", start=first)
        swept: list[int] = []
        if self.sweep and feed_start is not None:
            swept = self._unclaimed_matches(store, consumer, after=max(since, feed_start))
        elif self.sweep:
            self.log.info("The watcher has not started its feed yet: nothing to sweep")
        wanted = sorted({*triggered, *swept})
        mine = store.claim_replies(consumer, wanted, dag_id, run_id)
        self.log.info(
            "%d repl(ies) triggered this run, %d more found unclaimed by the sweep; %d claimed by this run, "
            "%d already handled by another run",
            len(set(triggered)), len(set(swept) - set(triggered)), len(mine), len(wanted) - len(mine),
        )  # fmt: skip
        rows = self._rows(store, mine)
        if not rows:
            raise AirflowSkipException(
                "No reply to handle: none triggered this run or was left unclaimed, or another run handled them."
            )
        return rows

    def _rows(self, store: StatusStore, inbound_ids: Sequence[int]) -> list[dict[str, Any]]:
        """One row per claimed reply still in the store; one erased or purged since is left out."""
        rows, gone = [], []
        for inbound_id in inbound_ids:
            reply = store.reply(inbound_id)
            if reply is None or not reply.sender:
                gone.append(inbound_id)
                continue
            rows.append({"inbound_id": inbound_id, "kind": reply.kind, "button_payload": reply.button_payload})
        if gone:
            self.log.warning("%d claimed repl(ies) are no longer in the store (erased or purged): %s", len(gone), gone)
        return rows

    def _triggering_ids(self, context: Context) -> list[int]:
        events = context.get("triggering_asset_events") or {}
        found = list(events[self.asset]) if events and self.asset in events else []
        payloads = [(event.extra or {}).get("payload") or {} for event in found]
        return [int(payload["inbound_id"]) for payload in payloads if "inbound_id" in payload]

    def _unclaimed_matches(self, store: StatusStore, consumer: str, after: int) -> list[int]:
        """Replies after ``after`` that the watcher's filters match and no run of ``consumer``
        claimed, read a page at a time."""
        wanted: ReplyFilter = self.watcher_trigger.filter
        since, found = time.time() - self.sweep_window, []
        only = {
            "kinds": wanted.kinds,
            "button_payloads": wanted.button_payloads,
            "dag_id": wanted.dag_id,
            "task_id": wanted.task_id,
        }
        while True:
            page = store.unclaimed_replies(consumer, after, since, SWEEP_PAGE, **only)
            found += [reply.inbound_id for reply in page if wanted.match(reply)[0]]
            if len(page) < SWEEP_PAGE:
                return found
            after = page[-1].inbound_id

"""WhatsAppReplySensor: wait until enough recipients of a send answered (poke, reschedule, deferrable).

Imported from ``airflow_provider_pepipost.sensors.whatsapp``, beside the delivery sensor.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.configuration import conf
from airflow.sdk import BaseSensorOperator, PokeReturnValue

from airflow_provider_pepipost.operators.xcom import parse_message_targets
from airflow_provider_pepipost.reply_filters import ReplyFilter, ReplyTally, needed_repliers, tally
from airflow_provider_pepipost.status.ledger import TaskKey
from airflow_provider_pepipost.status.store import open_store
from airflow_provider_pepipost.triggers.replies import WhatsAppReplySensorTrigger, replies_to_targets
from airflow_provider_pepipost.version_compat import AirflowFailException, AirflowSensorTimeout

if TYPE_CHECKING:
    from airflow.sdk import Context


class WhatsAppReplySensor(BaseSensorOperator):
    """Wait until enough recipients of a send task's messages replied, as the filters ask.

    Reads the status store that the webhook receiver fills. A recipient who replied twice counts
    once; a reply counts when it answers one of the messages (WhatsApp's reply context).

    :param message_ids: the send task's XCom: message ids, a ledger reference, or a list of those
        (a mapped send task). (templated)
    :param min_replies: recipients who must have replied; or
    :param min_ratio: the share of the messages' recipients who must have replied (default 1.0
        when neither is given).
    :param kinds: reply kinds that count (``text``, ``button``, ``image``, ``location``...).
    :param button_payloads: button payloads that count.
    :param keywords: words that count, compared as stop words are (case, spaces, punctuation).
    :param status_store_conn_id: the store's Airflow connection; None: the resolver's default.
    :param deferrable: wait in the triggerer instead of a worker slot.

    Returns (XCom ``return_value``) ``recipients``, ``repliers``, ``needed`` and the matching
    replies' ``inbound_ids`` (no number, no words: ``StatusStore.reply(inbound_id)`` reads those).
    """

    template_fields: Sequence[str] = ("message_ids",)
    ui_color = "#25d366"

    def __init__(
        self,
        *,
        message_ids: Any,
        min_replies: int | None = None,
        min_ratio: float | None = None,
        kinds: Sequence[str] | None = None,
        button_payloads: Sequence[str] | None = None,
        keywords: Sequence[str] | None = None,
        status_store_conn_id: str | None = None,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if min_replies is not None and min_ratio is not None:
            raise ValueError("give min_replies or min_ratio, not both")
        if min_replies is not None and (not isinstance(min_replies, int) or min_replies < 1):
            raise ValueError(f"min_replies must be a whole number of at least 1, not {min_replies!r}")
        if min_ratio is not None and not 0.0 < min_ratio <= 1.0:
            raise ValueError(f"min_ratio must be above 0 and at most 1, not {min_ratio!r}")
        self.message_ids = message_ids
        self.min_replies = min_replies
        self.min_ratio = min_ratio
        self.reply_filter = ReplyFilter.build(kinds, button_payloads, keywords)
        self.status_store_conn_id = status_store_conn_id
        self.deferrable = deferrable

    def _targets(self) -> list[str | TaskKey]:
        targets = parse_message_targets(self.message_ids)
        if not targets:
            raise AirflowFailException(
                "message_ids is empty: there are no messages whose replies to wait for. Did the send task accept "
                "no message, or does message_ids pull the wrong task's XCom?"
            )
        return targets

    def _count(self) -> ReplyTally:
        store = open_store(self.status_store_conn_id)
        targets = self._targets()
        found, recipients = replies_to_targets(store, targets)
        needed = needed_repliers(recipients, self.min_replies, self.min_ratio)
        if needed > recipients:
            raise AirflowFailException(
                f"min_replies is {needed} but only {recipients} message(s) were sent: the wait could never end"
            )
        return tally(found, recipients, needed, self.reply_filter)

    def poke(self, context: Context) -> PokeReturnValue:
        counted = self._count()
        self.log.info(
            "%d of %d recipients replied as asked (%d needed); %d matching replies",
            counted.repliers, counted.recipients, counted.needed, len(counted.inbound_ids),
        )  # fmt: skip
        return PokeReturnValue(counted.done, xcom_value=counted.to_dict() if counted.done else None)

    def execute(self, context: Context) -> Any:
        if not self.deferrable:
            try:
                return super().execute(context)
            except AirflowSensorTimeout as err:
                raise AirflowSensorTimeout(self._timeout_message(self._count())) from err
        first = self._count()
        if first.done:
            return first.to_dict()
        targets = self._targets()
        filters = self.reply_filter.to_kwargs()
        self.defer(
            trigger=WhatsAppReplySensorTrigger(
                message_ids=[t for t in targets if isinstance(t, str)],
                ledger_tasks=[dataclasses.asdict(t) for t in targets if isinstance(t, TaskKey)],
                needed=first.needed,
                kinds=filters["kinds"],
                button_payloads=filters["button_payloads"],
                keywords=filters["keywords"],
                status_store_conn_id=self.status_store_conn_id,
                poll_interval=self.poke_interval,
                deadline=time.time() + self.timeout,
            ),
            method_name="execute_complete",
            timeout=timedelta(seconds=self.timeout),
        )

    def _timeout_message(self, counted: ReplyTally) -> str:
        return (
            f"timed out after {self.timeout:g}s: {counted.repliers} of {counted.recipients} recipients replied as "
            f"asked, {counted.needed} needed"
        )

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        found = event.get("tally") or {}
        if event.get("status") == "success":
            self.log.info("%d of %d recipients replied as asked", found["repliers"], found["recipients"])
            return found
        if event.get("status") == "timeout":
            counted = ReplyTally(found["recipients"], found["repliers"], tuple(found["inbound_ids"]), found["needed"])
            raise AirflowSensorTimeout(self._timeout_message(counted))
        raise RuntimeError(f"the reply trigger stopped: {event}")

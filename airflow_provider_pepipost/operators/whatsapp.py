"""SendWhatsAppMediaOperator: send one WhatsApp media message to each row of an audience."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from airflow_provider_pepipost.audience import Audience
from airflow_provider_pepipost.connection_form import DEFAULT_CONN_ID
from airflow_provider_pepipost.hooks.pepipost import PepipostHook
from airflow_provider_pepipost.messages import MessageDefaults, iter_messages, validate_rows
from airflow_provider_pepipost.operators.campaign import CampaignError, CampaignSender
from airflow_provider_pepipost.status.store import TaskKey

if TYPE_CHECKING:
    from airflow.sdk import Context

# Above this many rows the ids are not listed in XCom (it lives in Airflow's metadata database):
# return_value becomes a ledger reference that WhatsAppMessageStatusSensor reads instead.
DEFAULT_XCOM_IDS_LIMIT = 10_000


class SendWhatsAppMediaOperator(BaseOperator):
    """Send a WhatsApp media message (image, document, video...) through Pepipost to each recipient.

    Every row is validated before the first send. Each message is written to the status store's
    ledger before its request goes out, so a retried task never sends a row twice.

    :param recipients: phone numbers, or row dicts (``recipient_whatsapp``, ``attachment_id`` or
        ``attachment_url``/``attachment_type``, ``caption``, ``recipient_type``, ``x-apiheader`` and
        any fields the caption's ``{placeholders}`` name), or a path to a CSV / JSON Lines file.
        Usually an upstream task's XCom. (templated)
    :param attachment_id: media id for rows that give none. (templated)
    :param attachment_url: media URL for rows that give none, with ``attachment_type``. (templated)
    :param attachment_type: image, video, audio, document or sticker. (templated)
    :param caption: caption for rows that give none; may hold ``{field}`` placeholders. (templated)
    :param source: WhatsApp source id; default: the connection extra ``source``. (templated)
    :param x_apiheader: x-apiheader for rows that give none; default: a value derived from the
        task instance and the row, echoed back in delivery reports. (templated)
    :param recipient_type: ``individual`` or ``group`` for rows that give none.
    :param pepipost_conn_id: the Pepipost connection.
    :param max_workers: messages in flight at once.
    :param max_rate: at most this many messages per second; None for no limit.
    :param max_rejected_ratio: share of rows the vendor may reject (unknown number, not opted in,
        outside the 24 h window...) before the task fails; sending stops as soon as it is exceeded.
    :param status_store_url: SQLAlchemy URL of the status store; default: the connection extra
        ``status_store_url``, then ``$PEPIPOST_STATUS_STORE_URL``, then SQLite in AIRFLOW_HOME.
    :param xcom_ids_limit: above this many rows, return a ledger reference instead of the ids.
    :param progress_interval: seconds between progress lines in the task log.

    Returns (XCom ``return_value``) the accepted message ids in input order, or a ledger
    reference ``{"pepipost_ledger": {...}}`` above ``xcom_ids_limit``. Pushes XCom ``messages``
    (one row per input row: recipient, x-apiheader, message id or null, state, error) when the ids
    are listed, and ``send_summary`` (counts) always.
    """

    template_fields: Sequence[str] = (
        "recipients",
        "attachment_id",
        "attachment_url",
        "attachment_type",
        "caption",
        "source",
        "x_apiheader",
    )
    template_fields_renderers = {"recipients": "py", "caption": "txt"}
    ui_color = "#25d366"

    def __init__(
        self,
        *,
        recipients: Any,
        attachment_id: str | None = None,
        attachment_url: str | None = None,
        attachment_type: str | None = None,
        caption: str | None = None,
        source: str | None = None,
        x_apiheader: str | None = None,
        recipient_type: str = "individual",
        pepipost_conn_id: str = DEFAULT_CONN_ID,
        max_workers: int = 16,
        max_rate: float | None = None,
        max_rejected_ratio: float = 0.0,
        status_store_url: str | None = None,
        xcom_ids_limit: int = DEFAULT_XCOM_IDS_LIMIT,
        progress_interval: float = 10.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.recipients = recipients
        self.attachment_id = attachment_id
        self.attachment_url = attachment_url
        self.attachment_type = attachment_type
        self.caption = caption
        self.source = source
        self.x_apiheader = x_apiheader
        self.recipient_type = recipient_type
        self.pepipost_conn_id = pepipost_conn_id
        self.max_workers = max_workers
        self.max_rate = max_rate
        self.max_rejected_ratio = max_rejected_ratio
        self.status_store_url = status_store_url
        self.xcom_ids_limit = xcom_ids_limit
        self.progress_interval = progress_interval

    def execute(self, context: Context) -> list[str] | dict[str, Any]:
        if self.max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        if not 0.0 <= self.max_rejected_ratio <= 1.0:
            raise ValueError("max_rejected_ratio must be between 0 and 1")
        hook = PepipostHook(self.pepipost_conn_id, pool_size=self.max_workers)
        audience = Audience(self.recipients)
        defaults = MessageDefaults(
            source=self.source or hook.settings.source,
            attachment_id=self.attachment_id or None,
            attachment_url=self.attachment_url or None,
            attachment_type=self.attachment_type or None,
            caption=self.caption,
            recipient_type=self.recipient_type,
            x_apiheader=self.x_apiheader or None,
        )
        self.log.info("Validating recipients from %s", audience.source_description)
        total = validate_rows(audience, defaults)
        self.log.info("All %d rows are valid; sending with %d workers", total, self.max_workers)

        ti = context["ti"]
        task = TaskKey(ti.dag_id, ti.run_id, ti.task_id, ti.map_index if ti.map_index is not None else -1)
        store = hook.get_status_store(self.status_store_url)
        keep = total <= self.xcom_ids_limit
        sender = CampaignSender(
            hook,
            store,
            task,
            total=total,
            max_workers=self.max_workers,
            max_rate=self.max_rate,
            max_rejected_ratio=self.max_rejected_ratio,
            keep_outcomes=keep,
            progress_interval=self.progress_interval,
            log=self.log,
        )
        try:
            result = sender.run(iter_messages(audience, defaults))
        finally:
            hook.close()

        summary = result.summary()
        ti.xcom_push(key="send_summary", value=summary)
        if keep and result.outcomes is not None:
            ti.xcom_push(key="messages", value=[outcome.to_dict() for outcome in result.outcomes])
        if result.counts["unknown"]:
            self.log.warning(
                "%d message(s) have an unknown outcome (no answer after sending); they are not resent and "
                "will be reconciled from delivery reports that echo their x-apiheader",
                result.counts["unknown"],
            )
        if result.fatal is not None:
            raise CampaignError(f"Sending stopped: {result.fatal}. Summary: {summary}")
        if result.stopped_reason:
            raise CampaignError(f"Sending stopped: {result.stopped_reason}. Summary: {summary}")
        if result.counts["rejected"] > sender.max_rejected:
            raise CampaignError(f"{result.counts['rejected']} of {total} rows were rejected. Summary: {summary}")
        self.log.info("Done: %s", summary)
        if not keep:
            return task.to_ref()
        return [o.message_id for o in result.outcomes or () if o.message_id is not None]

"""The send operators: one WhatsApp message, media or template, to each row of an audience."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.sdk import Asset, BaseOperator

from airflow_provider_pepipost.audience import Audience
from airflow_provider_pepipost.connection_form import DEFAULT_CONN_ID
from airflow_provider_pepipost.errors import CampaignError, MessageValidationError, PepipostConfigError, RowProblem
from airflow_provider_pepipost.hooks.pepipost import PepipostHook
from airflow_provider_pepipost.messages import MessageDefaults, build_message, iter_messages, validate_rows
from airflow_provider_pepipost.metrics import SendCounters, send_duration, task_tags
from airflow_provider_pepipost.operators.assets import emit, resolve_asset
from airflow_provider_pepipost.operators.campaign import CampaignResult, CampaignSender
from airflow_provider_pepipost.operators.links import WhatsAppCampaignLink
from airflow_provider_pepipost.operators.xcom import ledger_ref, message_targets
from airflow_provider_pepipost.outgoing import OutgoingMessage
from airflow_provider_pepipost.status.ledger import TaskKey
from airflow_provider_pepipost.status.resolver import store_source
from airflow_provider_pepipost.status.store import StatusStore, open_store
from airflow_provider_pepipost.template_messages import TEMPLATE_OPTIONS, TemplateDefaults, build_template_message
from airflow_provider_pepipost.version_compat import AirflowFailException

if TYPE_CHECKING:
    from airflow.sdk import Context

# Above this many rows the ids are not listed in XCom (it lives in Airflow's metadata database):
# return_value becomes a ledger reference that WhatsAppMessageStatusSensor reads instead.
DEFAULT_XCOM_IDS_LIMIT = 10_000
NUMBER_FIELD = "recipient_whatsapp"  # a row's phone number, in every kind


@dataclass(frozen=True)
class RowDefaults:
    """What every row is built with: the kind's operator-wide values, and the fallback template's."""

    message: Any
    fallback: TemplateDefaults | None = None


class WhatsAppCampaignOperator(BaseOperator):
    """The campaign engine as an operator: one message to each row of an audience, of one kind.

    Subclasses name the kind: its template fields, its operator-wide defaults
    (``message_defaults``) and its row builder (``build_message``), which returns a message that
    keeps the ``outgoing.OutgoingMessage`` contract. Everything else is shared: validation of
    every row before the first send, the fallback template of session kinds, concurrency, pacing,
    the ledger that makes retries safe, the judgement of the outcome and the XCom contract. See
    ``SendWhatsAppMediaOperator`` for the shared parameters.
    """

    template_fields: Sequence[str] = ("recipients", "source", "x_apiheader", "campaign_key", "fallback_template")
    template_fields_renderers = {"recipients": "py", "fallback_template": "py"}
    # A session kind meets WhatsApp's 24-hour window (8007) and may fall back to a template there.
    session_kind: ClassVar[bool] = True
    ui_color = "#25d366"
    operator_extra_links = (WhatsAppCampaignLink(),)

    def __init__(
        self,
        *,
        recipients: Any,
        source: str | None = None,
        x_apiheader: str | None = None,
        recipient_type: str = "individual",
        pepipost_conn_id: str = DEFAULT_CONN_ID,
        max_workers: int = 16,
        max_rate: float | None = None,
        max_rejected_ratio: float = 0.0,
        max_unknown_ratio: float = 0.1,
        campaign_key: str | None = None,
        resend_unknown: bool = False,
        respect_opt_outs: bool = True,
        status_store_conn_id: str | None = None,
        xcom_ids_limit: int = DEFAULT_XCOM_IDS_LIMIT,
        xcom_full_numbers: bool = False,
        campaign_asset: Asset | str | bool | None = None,
        progress_interval: float = 10.0,
        fallback_template: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.recipients = recipients
        self.fallback_template = fallback_template
        self.source = source
        self.x_apiheader = x_apiheader
        self.recipient_type = recipient_type
        self.pepipost_conn_id = pepipost_conn_id
        self.max_workers = max_workers
        self.max_rate = max_rate
        self.max_rejected_ratio = max_rejected_ratio
        self.max_unknown_ratio = max_unknown_ratio
        self.campaign_key = campaign_key
        self.resend_unknown = resend_unknown
        self.respect_opt_outs = respect_opt_outs
        self.status_store_conn_id = status_store_conn_id
        self.xcom_ids_limit = xcom_ids_limit
        self.xcom_full_numbers = xcom_full_numbers
        self.progress_interval = progress_interval
        self.campaign_asset = resolve_asset(campaign_asset, "campaign", self.dag_id, self.task_id)
        if self.campaign_asset is not None and self.campaign_asset not in self.outlets:
            self.outlets = [*self.outlets, self.campaign_asset]

    @classmethod
    def partial(cls, **kwargs: Any) -> Any:
        """``partial(...).expand(...)`` as Airflow's, with the campaign asset among the mapped task's
        outlets when the DAG is parsed: an asset that only the running instance names is not
        active, and Airflow drops its events ("Task has inactive assets")."""
        partial = super().partial(**kwargs)
        task_kwargs = partial.kwargs
        dag = task_kwargs.get("dag")
        asset = resolve_asset(
            task_kwargs.get("campaign_asset"), "campaign", getattr(dag, "dag_id", ""), task_kwargs["task_id"]
        )
        outlets = list(task_kwargs.get("outlets") or [])
        if asset is not None and asset not in outlets:
            task_kwargs["outlets"] = [*outlets, asset]
        return partial

    @cached_property
    def hook(self) -> PepipostHook:
        """The Pepipost hook, built once per task instance, its pool sized to the workers."""
        return PepipostHook(self.pepipost_conn_id, pool_size=self.max_workers)

    def message_defaults(self, hook: PepipostHook) -> Any:
        """The operator-wide values of this kind that a row's own values override."""
        raise NotImplementedError

    def build_message(self, item: Any, defaults: Any, row: int) -> tuple[OutgoingMessage | None, list[RowProblem]]:
        """One row as a message of this operator's kind, or the row's problems."""
        raise NotImplementedError

    def row_defaults(self, hook: PepipostHook) -> RowDefaults:
        """The kind's defaults, and the fallback template's when ``fallback_template`` is set."""
        kind = self.message_defaults(hook)
        if not self.fallback_template:
            return RowDefaults(kind)
        if not self.session_kind:
            raise PepipostConfigError(
                f"fallback_template is for session messages, which WhatsApp's 24-hour window can close; "
                f"{type(self).__name__} sends messages that reach a closed window themselves"
            )
        if not isinstance(self.fallback_template, dict):
            raise PepipostConfigError("fallback_template must be a dict of SendWhatsAppTemplateOperator parameters")
        unknown = set(self.fallback_template) - set(TEMPLATE_OPTIONS)
        if unknown:
            raise PepipostConfigError(
                f"fallback_template: unknown keys {sorted(unknown)}; it takes {list(TEMPLATE_OPTIONS)}"
            )
        source = self.source or hook.settings.source
        return RowDefaults(
            kind, TemplateDefaults(source=source, recipient_type=self.recipient_type, **self.fallback_template)
        )

    def build_row(self, item: Any, defaults: RowDefaults, row: int) -> tuple[OutgoingMessage | None, list[RowProblem]]:
        """One row as a message with its fallback template, if any; or every problem of both."""
        item, answering = self._answering(item, row)
        if answering:
            return None, answering
        message, problems = self.build_message(item, defaults.message, row)
        if defaults.fallback is None:
            return message, problems
        # The fallback is checked with the row too: no send starts while any row's template is bad.
        template, template_problems = build_template_message(item, defaults.fallback, row)
        problems += [dataclasses.replace(p, field=f"fallback_template.{p.field}") for p in template_problems]
        if problems or message is None:
            return None, problems
        return message.with_fallback(template), []

    def _answering(self, item: Any, row: int) -> tuple[Any, list[RowProblem]]:
        """A row that gives ``inbound_id`` and no number answers that customer message: the number
        is read from the status store, so that it never passes through XCom."""
        if not isinstance(item, dict) or "inbound_id" not in item or item.get(NUMBER_FIELD):
            return item, []
        given = item["inbound_id"]
        if isinstance(given, bool) or not isinstance(given, (int, str)) or not str(given).isdigit():
            return item, [RowProblem(row, "inbound_id", repr(given), "is not a customer message's id (a whole number)")]
        found = self._store_for_replies.reply(int(given))
        if found is None or not found.sender:
            reason = "no customer message with this id is in the status store (purged, or erased?)"
            return item, [RowProblem(row, "inbound_id", str(given), reason)]
        return {**item, NUMBER_FIELD: found.sender}, []

    @cached_property
    def _store_for_replies(self) -> StatusStore:
        return open_store(self.status_store_conn_id)

    def execute(self, context: Context) -> list[Any] | dict[str, Any]:
        for name in ("max_rejected_ratio", "max_unknown_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise AirflowFailException(f"{name} must be between 0 and 1, not {getattr(self, name)!r}")
        if self.max_workers < 1:
            raise AirflowFailException(f"max_workers must be at least 1, not {self.max_workers!r}")
        hook = self.hook
        audience = Audience(self.recipients)
        try:
            defaults = self.row_defaults(hook)
            self.log.info("Validating recipients from %s", audience.source_description)
            total = validate_rows(audience, defaults, self.build_row)
        except (MessageValidationError, PepipostConfigError) as err:
            raise AirflowFailException(str(err)) from err  # the same input fails the same way every try
        self.log.info("All %d rows are valid; sending with %d workers", total, self.max_workers)

        ti = context["ti"]
        task = TaskKey(ti.dag_id, ti.run_id, ti.task_id, ti.map_index if ti.map_index is not None else -1)
        self.log.info("Status store: %s", store_source(self.status_store_conn_id))
        store = open_store(self.status_store_conn_id)
        keep = total <= self.xcom_ids_limit
        tags = task_tags(ti.dag_id, ti.task_id)
        sender = CampaignSender(
            hook,
            store,
            task,
            total=total,
            campaign_key=self.campaign_key or None,
            generation=clear_generation(context),
            resend_unknown=self.resend_unknown,
            respect_opt_outs=self.respect_opt_outs,
            max_workers=self.max_workers,
            max_rate=self.max_rate,
            max_rejected_ratio=self.max_rejected_ratio,
            max_unknown_ratio=self.max_unknown_ratio,
            keep_outcomes=keep,
            progress_interval=self.progress_interval,
            log=self.log,
            on_progress=SendCounters(tags).report,
        )
        started = time.monotonic()
        try:
            result = sender.run(iter_messages(audience, defaults, self.build_row))
        except PepipostConfigError as err:  # the same setting fails every try the same way
            raise AirflowFailException(str(err)) from err
        finally:
            hook.close()
            send_duration(time.monotonic() - started, tags)

        summary = result.summary()
        ti.xcom_push(key="send_summary", value=summary)
        if keep and result.outcomes is not None:
            whole = self.xcom_full_numbers
            ti.xcom_push(key="messages", value=[outcome.to_dict(full_numbers=whole) for outcome in result.outcomes])
        judge_campaign(
            result, total, sender.max_rejected, self.max_unknown_ratio, self.log,
            max_rejected_ratio=self.max_rejected_ratio, has_fallback=bool(self.fallback_template),
        )  # fmt: skip
        self.log.info("Done: %s", summary)
        emit(context, self.campaign_asset, summary)
        campaign = task.of_campaign(sender.campaign_key)  # what the sensor counts: this campaign only
        if not keep:
            return ledger_ref(campaign)
        return message_targets(result.outcomes or [], campaign)


class SendWhatsAppMediaOperator(WhatsAppCampaignOperator):
    """Send a WhatsApp media message (image, document, video...) through Pepipost to each recipient.

    Every row is validated before the first send. Each message is written to the status store's
    ledger before its request goes out, so a retried task never sends a row twice.

    :param recipients: phone numbers, or row dicts (``recipient_whatsapp``, ``attachment_id`` or
        ``attachment_url``/``attachment_type``, ``caption``, ``recipient_type``, ``x-apiheader`` and
        any fields the caption's ``{placeholders}`` name), or a path to a CSV / JSON Lines file.
        Usually an upstream task's XCom. A row with ``inbound_id`` (a customer message's id, as
        ``WhatsAppReplyTrigger`` gives it) and no number goes to the number that wrote that
        message, read from the status store: no whole number passes through XCom. (templated)
    :param attachment_id: media id for rows that give none. (templated)
    :param attachment_url: media URL for rows that give none, with ``attachment_type``. (templated)
    :param attachment_type: image, video, audio, document or sticker. (templated)
    :param caption: caption for rows that give none; may hold ``{field}`` placeholders. (templated)
    :param fallback_template: send this template instead to the rows the vendor refuses with 8007
        (the recipient has not written in 24 hours): a dict of ``SendWhatsAppTemplateOperator``'s
        own parameter names (``template_name``, ``language``, ``attributes``, ``media_url``...),
        checked against every row before the first send. Such rows have state ``fallback``, are
        counted apart in ``send_summary``, and their template's id stands in ``return_value`` in
        input order. Idempotent across retries like every send. (templated)
    :param source: WhatsApp source id; default: the connection extra ``source``. (templated)
    :param x_apiheader: x-apiheader for rows that give none; default: a value derived from the
        task instance and the row, echoed back in delivery reports. (templated)
    :param recipient_type: ``individual`` or ``group`` for rows that give none.
    :param pepipost_conn_id: the Pepipost connection.
    :param max_workers: messages in flight at once.
    :param max_rate: at most this many messages per second; None for no limit.
    :param max_rejected_ratio: share of rows the vendor may reject (unknown number, not opted in,
        outside the 24 h window...) before the task fails; sending stops as soon as it is exceeded.
    :param max_unknown_ratio: share of rows whose outcome may stay unknown (the request left, the
        answer could not tell whether the vendor took it) before the task fails; a later try, once
        delivery reports reconciled them, may pass.
    :param campaign_key: names the campaign; every message's idempotency key and default
        x-apiheader derive from it, the recipient and everything the recipient would see. Default:
        the task in its run (dag, run, task; not the map index), so that retries and clears never
        send the same message twice, even when a cleared upstream hands the rows out to other map
        indexes. A row with the same recipient and content in two map indexes of one run is one
        message (``duplicate`` in the second). Give a new key to send the same content again on
        purpose. (templated)
    :param resend_unknown: send again the rows an earlier try left unknown. Off by default: such a
        row may have reached its recipient, who would then get the message twice.
    :param respect_opt_outs: skip recipients on the status store's suppression list (they replied
        a stop word, or a consent task opted them out); such rows have state ``suppressed`` and
        are counted in ``send_summary``. The list is read when each row is claimed, in the
        claim's transaction, and again just before a paced (``max_rate``) row goes out, so a STOP
        stored while the campaign runs stops every row claimed after it. Set False only for
        messages the recipient must get whatever they chose (check your obligations first).
    :param status_store_conn_id: Airflow connection (postgres or sqlite) of the status store;
        default ``[pepipost] status_store_conn_id``, then ``$PEPIPOST_STATUS_STORE_URL``, then SQLite
        in AIRFLOW_HOME (see ``airflow_provider_pepipost.status.resolver``).
    :param xcom_ids_limit: above this many rows, return a ledger reference instead of the ids.
    :param xcom_full_numbers: keep whole numbers in XCom ``messages``. Off by default: every user
        who can see the DAG can read XCom (REST API included), so rows hold masked numbers
        (``9198******69``), and the row index and message id join them back to the status store,
        which keeps the whole number. Turn it on only for a DAG whose downstream needs the numbers
        and whose readers may see them.
    :param progress_interval: seconds between progress lines in the task log.
    :param campaign_asset: the asset a successful send updates, with ``send_summary`` as the
        event's extra: default ``Asset("pepipost://campaign/<dag_id>/<task_id>")``; a string names
        it, an ``Asset`` is used as it is, False emits none.

    Returns (XCom ``return_value``) the accepted message ids in input order, followed, when some
    outcomes are unknown, by a ledger reference to those rows
    (``{"pepipost_ledger": {..., "outcome": "unknown"}}``) so that the sensor waits for them too;
    above ``xcom_ids_limit`` rows, one ledger reference ``{"pepipost_ledger": {...}}`` to all of
    them. Pushes XCom ``messages`` (one row per input row: masked recipient, x-apiheader, message
    id or null, state, error) when the ids are listed, and ``send_summary`` (counts) always.
    """

    template_fields: Sequence[str] = (
        *WhatsAppCampaignOperator.template_fields,
        "attachment_id",
        "attachment_url",
        "attachment_type",
        "caption",
    )
    template_fields_renderers = {"recipients": "py", "caption": "txt", "fallback_template": "py"}

    def __init__(
        self,
        *,
        attachment_id: str | None = None,
        attachment_url: str | None = None,
        attachment_type: str | None = None,
        caption: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.attachment_id = attachment_id
        self.attachment_url = attachment_url
        self.attachment_type = attachment_type
        self.caption = caption

    def message_defaults(self, hook: PepipostHook) -> MessageDefaults:
        return MessageDefaults(
            source=self.source or hook.settings.source,
            attachment_id=self.attachment_id or None,
            attachment_url=self.attachment_url or None,
            attachment_type=self.attachment_type or None,
            caption=self.caption,
            recipient_type=self.recipient_type,
            x_apiheader=self.x_apiheader or None,
        )

    def build_message(
        self, item: Any, defaults: MessageDefaults, row: int
    ) -> tuple[OutgoingMessage | None, list[RowProblem]]:
        return build_message(item, defaults, row)


class SendWhatsAppTemplateOperator(WhatsAppCampaignOperator):
    """Send an approved WhatsApp template message through Pepipost to each recipient.

    The way to reach people who have not written to the business in the last 24 hours (media
    messages to them get 8007). The same engine, ledger, retries and XCom contract as
    ``SendWhatsAppMediaOperator``, whose shared parameters it takes; the sensor waits on its
    messages the same way.

    :param template_name: the approved template's name, for rows that give none. (templated)
    :param language: the template's approved locale (``en``, ``pt_BR``...). (templated)
    :param language_policy: ``deterministic`` or ``fallback``; None leaves it to the vendor.
    :param attributes: the template's variables in order; each may hold ``{field}`` placeholders
        filled from the row. A row's own ``attributes`` list wins. (templated)
    :param media_url: URL of a media header (with ``media_type``) for rows that give none. (templated)
    :param media_type: ``document``, ``image`` or ``video``. (templated)
    :param ttl: whole days; a message the vendor has not processed within them is not sent.
    """

    template_fields: Sequence[str] = (
        *WhatsAppCampaignOperator.template_fields,
        "template_name",
        "language",
        "attributes",
        "media_url",
        "media_type",
    )
    template_fields_renderers = {"recipients": "py", "attributes": "py"}
    ui_color = "#075e54"
    session_kind = False  # a template reaches a closed window itself: no fallback_template

    def __init__(
        self,
        *,
        template_name: str | None = None,
        language: str = "en",
        language_policy: str | None = None,
        attributes: Sequence[str] | None = None,
        media_url: str | None = None,
        media_type: str | None = None,
        ttl: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.template_name = template_name
        self.language = language
        self.language_policy = language_policy
        self.attributes = attributes
        self.media_url = media_url
        self.media_type = media_type
        self.ttl = ttl

    def message_defaults(self, hook: PepipostHook) -> TemplateDefaults:
        return TemplateDefaults(
            source=self.source or hook.settings.source,
            template_name=self.template_name or None,
            language=self.language or "en",
            language_policy=self.language_policy or None,
            attributes=self.attributes,
            media_url=self.media_url or None,
            media_type=self.media_type or None,
            ttl=self.ttl,
            recipient_type=self.recipient_type,
            x_apiheader=self.x_apiheader or None,
        )

    def build_message(
        self, item: Any, defaults: TemplateDefaults, row: int
    ) -> tuple[OutgoingMessage | None, list[RowProblem]]:
        return build_template_message(item, defaults, row)


def clear_generation(context: Context) -> int:
    """How many times the run was cleared: the ledger tells a clear's rows from a duplicate row by it."""
    return int(getattr(context.get("dag_run"), "clear_number", None) or 0)


def judge_campaign(
    result: CampaignResult,
    total: int,
    max_rejected: int,
    max_unknown_ratio: float,
    log: Any,
    *,
    max_rejected_ratio: float = 0.0,
    has_fallback: bool = False,
) -> None:
    """Fail the task unless the campaign did what a green task says it did; say why in words."""
    summary = result.summary()
    counts = result.counts
    if result.duplicate_rows:
        log.warning(
            "%d row(s) repeat an earlier row of this campaign exactly (the same recipient and content) and were "
            "not sent twice: rows %s%s",
            counts["duplicate"], ", ".join(map(str, result.duplicate_rows)),
            " ..." if counts["duplicate"] > len(result.duplicate_rows) else "",
        )  # fmt: skip
    if counts["unknown"]:
        log.warning(
            "%d message(s) have an unknown outcome (the request left, but the answer could not tell whether the "
            "vendor took it). They are not sent again; delivery reports that echo their x-apiheader reconcile "
            "them. To send them again anyway (a recipient may get it twice), set resend_unknown=True and clear "
            "the task.",
            counts["unknown"],
        )
    why = refusal_reasons(result, has_fallback)
    if result.fatal is not None:
        raise AirflowFailException(f"Sending stopped: {result.fatal}. Summary: {summary}")
    if result.stopped is not None:
        raise CampaignError(
            f"Sending stopped: {result.stopped}. The rows not sent are sent by the next try. Summary: {summary}"
        )
    if counts["rejected"] > max_rejected:
        raise AirflowFailException(
            f"{counts['rejected']} of {total} rows were rejected by the vendor, more than max_rejected_ratio="
            f"{max_rejected_ratio:g} allows ({max_rejected} row(s): {max_rejected_ratio * 100:g} % of {total}). "
            f"{why}A retry would send them again and meet the same refusals. Summary: {summary}"
        )
    if result.stopped_reason:
        raise CampaignError(f"Sending stopped: {result.stopped_reason}. Summary: {summary}")
    if counts["unknown"] > max_unknown_ratio * total + 1e-9:
        raise CampaignError(
            f"{counts['unknown']} of {total} outcomes are unknown, more than max_unknown_ratio "
            f"({max_unknown_ratio:g}) allows: the vendor or the network failed mid-answer. A later try counts the "
            f"ones delivery reports reconcile by then. Summary: {summary}"
        )
    if total and not counts["accepted"] and not counts["fallback"]:
        text = f"None of the {total} rows was accepted by the vendor. {why}"
        if not counts["not_sent"] and not counts["unknown"]:
            raise AirflowFailException(
                f"{text}Every row was refused, repeated or opted out: a retry would meet the same. Summary: {summary}"
            )
        raise CampaignError(f"{text}Summary: {summary}")


# What a refusal means, where its code alone says little to a marketer.
REFUSAL_HINTS = {
    "8002": "8002: those numbers have no WhatsApp opt-in with the vendor; opt them in first (WhatsAppConsentOperator).",
    "8003": "8003: those numbers are not on WhatsApp.",
    "8007": "8007: those recipients have not written to the business in the last 24 hours, so WhatsApp's "
    "session window is closed and only an approved template reaches them: use SendWhatsAppTemplateOperator, "
    "or set fallback_template={...} on SendWhatsAppMediaOperator to send one to those rows.",
}


def refusal_reasons(result: CampaignResult, has_fallback: bool, top: int = 3) -> str:
    """The vendor's most common refusals, counted, with what the usual codes mean ('' for none)."""
    if not result.reasons:
        return ""
    shown = [
        f"{code or 'no code'} {message!r} ({count} row{'s' if count != 1 else ''})"
        for (code, message), count in result.reasons.most_common(top)
    ]
    others = sum(result.reasons.values()) - sum(count for _, count in result.reasons.most_common(top))
    text = "The vendor's reasons: " + "; ".join(shown) + (f"; {others} row(s) for other reasons" if others else "")
    codes = {code for code, _ in result.reasons}
    hints = [hint for code, hint in REFUSAL_HINTS.items() if code in codes and not (code == "8007" and has_fallback)]
    return text + ". " + "".join(f"{hint} " for hint in hints)

"""WhatsAppConsentOperator: record opt-ins and opt-outs with the vendor, in batches, once each.

Airflow glue: settings, template fields, the task's identity and the verdict. The calls are the
consent engine's (``consent_engine``).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from airflow_provider_pepipost import limits
from airflow_provider_pepipost.audience import Audience
from airflow_provider_pepipost.connection_form import DEFAULT_CONN_ID
from airflow_provider_pepipost.consent import CONSENT_KINDS, SOURCE_MAX, ConsentDefaults, build_consent_row
from airflow_provider_pepipost.errors import CampaignError, MessageValidationError, PepipostConfigError
from airflow_provider_pepipost.hooks.pepipost import PepipostHook
from airflow_provider_pepipost.messages import iter_messages, validate_rows
from airflow_provider_pepipost.numbers import mask_number, mask_numbers_in
from airflow_provider_pepipost.operators.consent_engine import ConsentEngine, ConsentTally, OptOutPass
from airflow_provider_pepipost.status.ledger import TaskKey
from airflow_provider_pepipost.status.resolver import store_source
from airflow_provider_pepipost.status.store import open_store
from airflow_provider_pepipost.version_compat import AirflowFailException

if TYPE_CHECKING:
    from airflow.sdk import Context


class WhatsAppConsentOperator(BaseOperator):
    """Opt recipients in to (or out of) WhatsApp messages through Pepipost's consent API.

    Pepipost checks an opt-in before every send (8002 otherwise). Every row is validated before
    the first call; rows go in batches of ``batch_size``, ``max_workers`` batches at a time. The
    vendor's answer does not say which row of a refused batch was wrong, so a refused batch is
    reported with all its rows. Each confirmed batch is recorded in the status store: a retried
    task does not call the vendor again for it. A confirmed opt-out puts its numbers on the
    store's suppression list, which both send operators honour; a confirmed opt-in takes them off.

    :param recipients: phone numbers, or row dicts (``recipient``, optional ``source``,
        ``user_agent``, ``ip``), or a path to a CSV / JSON Lines file, read as a stream; usually
        an upstream task's XCom. (templated)
    :param kind: ``optin`` or ``optout``. (templated)
    :param source: where the consent came from, for rows that give none (the vendor requires it,
        at most 25 characters). (templated)
    :param user_agent: user agent for rows that give none. (templated)
    :param ip: IP address for rows that give none; validated. (templated)
    :param batch_size: recipients per call. The vendor does not document a limit for this API;
        keep it modest.
    :param max_workers: calls in flight at once.
    :param max_rejected_ratio: share of rows whose batch the vendor may refuse before the task
        fails (without Airflow retries: the same rows would be refused again).
    :param sync_reply_opt_outs: also pass on to the vendor, as opt-outs, the numbers that opted
        out by replying a stop word (recorded by the webhook receiver, which never calls the
        vendor itself). Each is passed on once. A batch the vendor refuses is split until the
        numbers it refuses stand alone; the task fails while any of them is not passed on.
    :param reply_opt_out_source: the ``source`` of those opt-outs, and of the opt-outs of numbers
        that said STOP while their opt-in was with the vendor (the vendor requires it, at most 25
        characters; checked before any call).
    :param lift_opt_outs: for ``optin``: also opt in numbers on the suppression list, taking them
        off it. Off by default: a sign-up list processed again must not undo a later "STOP".
        Set it only for rows that record a new consent given after the opt-out. Only opt-outs
        recorded before a batch was read are lifted: a STOP that arrives while the batch is with
        the vendor always stays, and is passed on to the vendor.
    :param pepipost_conn_id: the Pepipost connection.
    :param status_store_conn_id: Airflow connection of the status store (see the send operators).

    Returns (XCom ``return_value``) the counts: ``kind``, ``total``, ``confirmed``, ``refused``,
    ``not_confirmed``, ``skipped_opted_out``, ``opted_out_during_call``, ``batches``,
    ``batches_reused``, ``reply_opt_outs_synced``, ``reply_opt_outs_refused``,
    ``reply_opt_outs_invalid``, ``reply_opt_outs_not_confirmed``, ``reply_opt_outs_refused_calls``
    (the opt-out calls the vendor refused while isolating the numbers it refuses), and
    ``failed_rows`` (the first 100 rows the vendor refused: row, masked recipient, error_code,
    error_message).
    """

    template_fields: Sequence[str] = ("recipients", "kind", "source", "user_agent", "ip")
    template_fields_renderers = {"recipients": "py"}
    ui_color = "#25d366"

    def __init__(
        self,
        *,
        recipients: Any = None,
        kind: str = "optin",
        source: str | None = None,
        user_agent: str | None = None,
        ip: str | None = None,
        batch_size: int = 100,
        max_workers: int = 4,
        max_rejected_ratio: float = 0.0,
        sync_reply_opt_outs: bool = False,
        reply_opt_out_source: str = "WHATSAPP_REPLY",
        lift_opt_outs: bool = False,
        pepipost_conn_id: str = DEFAULT_CONN_ID,
        status_store_conn_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.recipients = recipients
        self.kind = kind
        self.source = source
        self.user_agent = user_agent
        self.ip = ip
        self.batch_size = batch_size
        self.max_workers = max_workers
        self.max_rejected_ratio = max_rejected_ratio
        self.sync_reply_opt_outs = sync_reply_opt_outs
        self.reply_opt_out_source = reply_opt_out_source
        self.lift_opt_outs = lift_opt_outs
        self.pepipost_conn_id = pepipost_conn_id
        self.status_store_conn_id = status_store_conn_id

    @cached_property
    def hook(self) -> PepipostHook:
        """The Pepipost hook, built once per task instance, its pool sized to the workers."""
        return PepipostHook(self.pepipost_conn_id, pool_size=self.max_workers)

    def _check_settings(self) -> None:
        if self.kind not in CONSENT_KINDS:
            raise AirflowFailException(f"kind must be one of {CONSENT_KINDS}, not {self.kind!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise AirflowFailException(f"batch_size must be a whole number of at least 1, not {self.batch_size!r}")
        if self.max_workers < 1:
            raise AirflowFailException(f"max_workers must be at least 1, not {self.max_workers!r}")
        if not 0.0 <= self.max_rejected_ratio <= 1.0:
            raise AirflowFailException(f"max_rejected_ratio must be between 0 and 1, not {self.max_rejected_ratio!r}")
        if self.recipients is None and not self.sync_reply_opt_outs:
            raise AirflowFailException("recipients: is required (unless the task only syncs reply opt-outs)")
        if problem := _source_problem(self.reply_opt_out_source):
            # The vendor would refuse every opt-out call for it, and each refused batch is halved
            # down to single numbers: about two calls per opt-out, all refused.
            raise AirflowFailException(f"reply_opt_out_source: {problem}; no opt-out was passed on")

    def execute(self, context: Context) -> dict[str, Any]:
        self._check_settings()
        defaults = ConsentDefaults(self.source or None, self.user_agent or None, self.ip or None)
        audience, total = self._validated_audience(defaults)
        ti = context["ti"]
        task = TaskKey(ti.dag_id, ti.run_id, ti.task_id, ti.map_index if ti.map_index is not None else -1)
        self.log.info("Status store: %s", store_source(self.status_store_conn_id))
        store = open_store(self.status_store_conn_id)
        hook = self.hook
        engine = ConsentEngine(
            hook, store, task, kind=self.kind, batch_size=self.batch_size,
            max_workers=self.max_workers, lift_opt_outs=self.lift_opt_outs,
            reply_opt_out_source=self.reply_opt_out_source.strip(), log=self.log,
        )  # fmt: skip
        try:
            rows = iter_messages(audience, defaults, build_consent_row)
            tally, passed = engine.run(rows, total, sync_reply_opt_outs=self.sync_reply_opt_outs)
        finally:
            hook.close()
        return self._judge(tally, total, passed)

    def _validated_audience(self, defaults: ConsentDefaults) -> tuple[Audience | list[Any], int]:
        """The recipients, every row checked before the first call, and how many rows they hold."""
        audience: Audience | list[Any] = []
        try:
            if self.recipients is not None:
                audience = Audience(self.recipients, number_columns=("recipient", "recipient_whatsapp"))
                self.log.info("Validating recipients from %s", audience.source_description)
            total = validate_rows(audience, defaults, build_consent_row)
        except (MessageValidationError, PepipostConfigError) as err:
            raise AirflowFailException(str(err).replace("nothing was sent", "no consent was recorded")) from err
        if self.recipients is not None and not total:
            raise AirflowFailException("recipients: holds no rows; there is no consent to record")
        return audience, total

    def _judge(self, tally: ConsentTally, total: int, passed: OptOutPass) -> dict[str, Any]:
        result = {
            "kind": self.kind,
            "total": total,
            "confirmed": tally.confirmed,
            "refused": tally.refused,
            "not_confirmed": tally.not_confirmed,
            "skipped_opted_out": tally.skipped_opted_out,
            "opted_out_during_call": len(tally.opted_out_during_call),
            "batches": tally.batches,
            "batches_reused": tally.batches_reused,
            "reply_opt_outs_synced": len(passed.synced),
            "reply_opt_outs_refused": len(passed.refused),
            "reply_opt_outs_invalid": len(passed.invalid),
            "reply_opt_outs_not_confirmed": passed.not_confirmed,
            "reply_opt_outs_refused_calls": passed.refused_calls,
            "failed_rows": tally.failed_rows,
        }
        counts = {k: v for k, v in result.items() if k != "failed_rows"}
        if (stop := tally.stop or passed.stop) is not None:
            raise AirflowFailException(f"Consent calls stopped: {stop}. Counts: {counts}")
        allowed = int(self.max_rejected_ratio * total + 1e-9)
        if tally.refused > allowed:
            shown = ", ".join(f"row {r['row']} ({r['recipient']})" for r in tally.failed_rows[:5])
            raise AirflowFailException(
                f"The vendor refused {tally.refused} of {total} rows, more than max_rejected_ratio allows ({allowed}); "
                f"a retry would meet the same refusals. First refused: {shown}. Counts: {counts}"
            )
        if tally.not_confirmed:
            raise CampaignError(
                f"{tally.not_confirmed} row(s) were not confirmed by the vendor ({tally.transient}); the confirmed "
                f"batches are recorded, and the next try calls only the others. Counts: {counts}"
            )
        if passed.unsynced:
            raise _unsynced_error(passed, counts) from None  # its traceback is in the log, masked
        if tally.skipped_opted_out:
            self.log.warning(
                "%d number(s) opted out earlier (a stop word, or an opt-out) and were not opted in again. If they "
                "gave their consent anew, opt them in with lift_opt_outs=True.",
                tally.skipped_opted_out,
            )
        self.log.info("Done: %s", counts)
        return result


def _source_problem(source: object) -> str | None:
    """Why the vendor cannot take ``source`` as a consent's source (the rule of the rows' own)."""
    if not isinstance(source, str) or not source.strip():
        return "is required by the vendor: where the opt-outs came from (e.g. 'WHATSAPP_REPLY')"
    if len(source.strip()) > SOURCE_MAX:
        return f"is {len(source.strip())} characters; the vendor takes at most {SOURCE_MAX}"
    return limits.text_problem(source)


def _unsynced_error(passed: OptOutPass, counts: dict[str, Any]) -> Exception:
    """The failure for opt-outs that stayed off the vendor: retryable while a try may pass some on."""
    named = [f"{mask_number(number)} ({reason})" for number, reason in passed.refused[:5]]
    named += [f"{mask_number(number)} (not a number of 10 to 15 digits)" for number in passed.invalid[:5]]
    named += [f"{mask_number(number)} (not confirmed)" for number in passed.left[:5]]
    summary = (
        f"{passed.unsynced} opt-out(s) could not be passed on to the vendor and stay unsynced: "
        f"{len(passed.refused)} refused (in {passed.refused_calls} refused call(s)), "
        f"{len(passed.invalid)} not valid numbers, {passed.not_confirmed} not confirmed. First: {', '.join(named)}. "
        f"They stay on the status store's suppression list and are never messaged. The other "
        f"{len(passed.synced)} were passed on"
    )
    if passed.unexpected is not None:
        err = passed.unexpected
        cause = f"{type(err).__name__}: {mask_numbers_in(str(err))}"
        return CampaignError(
            f"Passing opt-outs on to the vendor failed unexpectedly ({cause}). {summary}; the next try passes "
            f"on those not confirmed. Counts: {counts}"
        )
    if passed.not_confirmed:
        return CampaignError(
            f"{summary}. The vendor did not confirm {passed.not_confirmed} ({passed.error}); the next try passes "
            f"them on. Counts: {counts}"
        )
    return AirflowFailException(
        f"{summary}. A retry would meet the same refusals; every run that passes opt-outs on tries them again. "
        f"Counts: {counts}"
    )

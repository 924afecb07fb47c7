"""WhatsAppMessageStatusSensor: wait until sent messages reach a delivery status (poke, reschedule, deferrable)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from airflow.configuration import conf
from airflow.sdk import Asset, BaseSensorOperator, PokeReturnValue

from airflow_provider_pepipost.errors import WhatsAppDeliveryFailed
from airflow_provider_pepipost.metrics import delivery_verdict, task_tags
from airflow_provider_pepipost.operators.assets import emit, resolve_asset
from airflow_provider_pepipost.operators.xcom import parse_message_targets
from airflow_provider_pepipost.sensors.replies import WhatsAppReplySensor
from airflow_provider_pepipost.status.ledger import TaskKey
from airflow_provider_pepipost.status.model import (
    FAIL_ON_POLICIES,
    TARGET_STATUSES,
    UNKNOWN_POLICIES,
    DeliverySummary,
    evaluate,
)
from airflow_provider_pepipost.status.reports import check_rate_card, price
from airflow_provider_pepipost.status.store import open_store
from airflow_provider_pepipost.triggers.status import WhatsAppMessageStatusTrigger
from airflow_provider_pepipost.version_compat import AirflowFailException, AirflowSensorTimeout, AirflowSkipException

if TYPE_CHECKING:
    from airflow.sdk import Context

__all__ = ["WhatsAppMessageStatusSensor", "WhatsAppReplySensor"]


class WhatsAppMessageStatusSensor(BaseSensorOperator):
    """Wait until WhatsApp messages reach ``target_status`` according to their delivery reports.

    Reads the status store that the webhook receiver fills; it never calls Pepipost.

    :param message_ids: the send task's XCom: a list of message ids, a ledger reference, or a list
        of those (a mapped send task). (templated)
    :param target_status: ``sent``, ``delivered`` or ``read``; a message further along counts. (templated)
    :param min_success_ratio: share of the messages that must reach the target.
    :param fail_on: ``unreachable`` (default) fails once too many messages failed for the ratio to
        be met; ``any`` fails at the first failed message; ``never`` waits until the timeout.
    :param unknown_policy: sends whose outcome is unknown (timed out, not yet reconciled) are
        waited on (``wait``), left out of the count (``ignore``) or fail the sensor (``fail``).
    :param status_store_conn_id: Airflow connection (postgres or sqlite) of the status store; default
        as the send operators resolve it (``airflow_provider_pepipost.status.resolver``).
    :param deferrable: wait in the triggerer instead of a worker slot; default Airflow's
        ``[operators] default_deferrable``.
    :param delivery_asset: the asset the sensor updates when the wait succeeds, with the delivery
        counts as the event's extra: default ``Asset("pepipost://delivery/<dag_id>/<task_id>")``;
        a string names it, an ``Asset`` is used as it is, False emits none.
    :param rate_card: prices per billable message by pricing category, and a currency
        (``{"currency": "INR", "marketing": 0.78, "utility": 0.115}``): the summary then carries
        ``estimated_cost``. Default: none.

    Returns (XCom ``return_value``) the delivery summary: counts by status, pending, unknown, the
    failed ids with their remarks, and what the reports said the messages cost (``billable`` by
    category, ``not_billable``, ``pricing_not_reported``: webhook v1 reports carry no pricing).
    """

    template_fields: Sequence[str] = ("message_ids", "target_status")
    ui_color = "#128c7e"

    def __init__(
        self,
        *,
        message_ids: Any,
        target_status: str = "delivered",
        min_success_ratio: float = 1.0,
        fail_on: str = "unreachable",
        unknown_policy: str = "wait",
        status_store_conn_id: str | None = None,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        delivery_asset: Asset | str | bool | None = None,
        rate_card: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.rate_card = rate_card
        self.delivery_asset = resolve_asset(delivery_asset, "delivery", self.dag_id, self.task_id)
        if self.delivery_asset is not None:
            self.outlets = [*self.outlets, self.delivery_asset]
        self.message_ids = message_ids
        self.target_status = target_status
        self.min_success_ratio = min_success_ratio
        self.fail_on = fail_on
        self.unknown_policy = unknown_policy
        self.status_store_conn_id = status_store_conn_id
        self.deferrable = deferrable
        if fail_on not in FAIL_ON_POLICIES:
            raise ValueError(f"fail_on must be one of {FAIL_ON_POLICIES}, not {fail_on!r}")
        if unknown_policy not in UNKNOWN_POLICIES:
            raise ValueError(f"unknown_policy must be one of {UNKNOWN_POLICIES}, not {unknown_policy!r}")
        if not 0.0 <= min_success_ratio <= 1.0:
            raise ValueError(f"min_success_ratio must be between 0 and 1, not {min_success_ratio!r}")
        if rate_card:  # a bad card fails the DAG's parse, not the sensor once the wait is done
            check_rate_card(rate_card)

    def _check_target(self) -> None:
        if self.target_status not in TARGET_STATUSES:
            raise ValueError(f"target_status must be one of {TARGET_STATUSES}, not {self.target_status!r}")

    def _targets(self) -> list[str | TaskKey]:
        targets = parse_message_targets(self.message_ids)
        if not targets:
            raise AirflowFailException(
                "message_ids is empty: there is nothing to wait for. Did the send task accept no message, "
                "or does message_ids pull the wrong task's XCom?"
            )
        return targets

    def _summarize(self) -> DeliverySummary:
        return open_store(self.status_store_conn_id).summarize(self._targets())

    def timeout_message(self, summary: dict[str, Any] | None = None) -> str:
        """Why the wait ended without a verdict, and where to look: mostly, reports did not arrive."""
        store = open_store(self.status_store_conn_id)
        targets = self._targets()
        if summary is None:
            summary = store.summarize(targets).to_dict()
        text = (
            f"timed out after {self.timeout:g}s: {summary['pending']} pending, {summary['unknown']} unknown, "
            f"counts {summary['counts']}. "
        )
        ours, anyone = store.last_report_at(targets), store.last_report_at()
        if ours is not None:
            return text + f"The last delivery report for these messages arrived at {_utc(ours)}."
        hint = (
            "Check that the webhook receiver is running and reachable from Pepipost at the URL set in the "
            "vendor's dashboard, and that the dashboard's token is the receiver's (PEPIPOST_WEBHOOK_TOKEN or "
            "[pepipost] webhook_token): refused reports are counted on the receiver's /pepipost/status."
        )
        if anyone is None:
            return text + "The status store has never received a delivery report. " + hint
        return (
            text + f"No report for these messages has arrived (the last one for any message: {_utc(anyone)}). " + hint
        )

    def poke(self, context: Context) -> PokeReturnValue:
        self._check_target()
        summary = self._summarize()
        verdict = evaluate(summary, self.target_status, self.min_success_ratio, self.fail_on, self.unknown_policy)
        self.log.info(
            "%d of %d reached '%s' (need %.0f%%); counts %s, pending %d, unknown %d",
            summary.reached(self.target_status), summary.total, self.target_status, 100 * self.min_success_ratio,
            summary.counts, summary.pending, summary.unknown,
        )  # fmt: skip
        if verdict.failed:
            raise WhatsAppDeliveryFailed(verdict.reason)
        return PokeReturnValue(verdict.done, xcom_value=self._priced(summary.to_dict()) if verdict.done else None)

    def _priced(self, summary: dict[str, Any]) -> dict[str, Any]:
        """The summary, with its billable messages priced by ``rate_card`` when there is one."""
        if not self.rate_card:
            return summary
        card = check_rate_card(self.rate_card)
        estimate = price(
            summary.get("billable", {}),
            card,
            not_billable=summary.get("not_billable", 0),
            not_reported=summary.get("pricing_not_reported", 0),
        )
        return {**summary, "estimated_cost": estimate}

    def execute(self, context: Context) -> Any:
        since = self._waiting_since(context)
        if not self.deferrable:
            try:
                summary = super().execute(context)
            except AirflowSensorTimeout as err:
                self._verdict(reached=False)
                raise AirflowSensorTimeout(self._timeout_explained()) from err
            except WhatsAppDeliveryFailed:
                self._verdict(reached=False)
                raise
            except AirflowSkipException as err:
                # soft_fail or never_fail made a skip of the timeout (no cause, or the timeout) or of
                # too many failures: verdicts. Of anything else (never_fail, a store that is down): none.
                cause = err.__cause__
                if cause is None or isinstance(cause, (AirflowSensorTimeout, WhatsAppDeliveryFailed)):
                    self._verdict(reached=False)
                    self.log.warning("Skipped: %s", cause if cause is not None else self._timeout_explained())
                raise
            self._verdict(reached=True, since=since)
            self._emit(context, summary)
            return summary
        try:
            first = self.poke(context)
        except WhatsAppDeliveryFailed:
            self._verdict(reached=False)
            raise
        if first.is_done:
            self._verdict(reached=True, since=since)
            self._emit(context, first.xcom_value)
            return first.xcom_value
        targets = self._targets()
        self.defer(
            trigger=WhatsAppMessageStatusTrigger(
                message_ids=[t for t in targets if isinstance(t, str)],
                ledger_tasks=[dataclasses.asdict(t) for t in targets if isinstance(t, TaskKey)],
                status_store_conn_id=self.status_store_conn_id,
                target_status=self.target_status,
                min_success_ratio=self.min_success_ratio,
                fail_on=self.fail_on,
                unknown_policy=self.unknown_policy,
                poll_interval=self.poke_interval,
                deadline=time.time() + self.timeout,
            ),
            method_name="execute_complete",
            kwargs={"waiting_since": since},
            timeout=timedelta(seconds=self.timeout),
        )

    def _waiting_since(self, context: Context) -> float:
        """When the wait began (epoch seconds): in reschedule mode, the first poke of this try."""
        if self.reschedule:
            first = context["ti"].get_first_reschedule_date(context)
            if first is not None:
                return first.timestamp()
        return time.time()

    def _verdict(self, *, reached: bool, since: float | None = None) -> None:
        waited = None if since is None else max(time.time() - since, 0.0)
        delivery_verdict(self.target_status, reached, waited, task_tags(self.dag_id, self.task_id))

    def _emit(self, context: Context, summary: dict[str, Any] | None) -> None:
        """The delivery asset's event: the counts, not the failed ids."""
        if summary:
            kept = ("total", "counts", "pending", "unknown", "failed_total")
            counts: dict[str, Any] = {k: summary[k] for k in kept if k in summary}
            emit(context, self.delivery_asset, {"target_status": self.target_status, **counts})

    def resume_execution(self, next_method: str, next_kwargs: dict[str, Any] | None, context: Context) -> Any:
        if next_method == TRIGGER_FAILED and (next_kwargs or {}).get("error") == TRIGGER_TIMEOUT:
            # Airflow's timeout of the deferral came before the trigger's own deadline: no event
            # reached execute_complete, which gives every other verdict. (A trigger that failed is
            # no verdict: Airflow logs its traceback.)
            self._verdict(reached=False)
            explained = self._timeout_explained()
            try:
                return super().resume_execution(next_method, next_kwargs, context)
            except AirflowSensorTimeout as err:
                raise AirflowSensorTimeout(explained) from err
            except AirflowSkipException:  # soft_fail or never_fail
                self.log.warning("Skipped: %s", explained)
                raise
        return super().resume_execution(next_method, next_kwargs, context)

    def _timeout_explained(self, summary: dict[str, Any] | None = None) -> str:
        """``timeout_message``, or, when the store cannot be read for it, the timeout alone: the
        explanation never stands in for the error or the skip it explains."""
        try:
            return self.timeout_message(summary)
        except Exception as err:
            return f"timed out after {self.timeout:g}s (the status store could not be read to say more: {err})"

    def execute_complete(
        self, context: Context, event: dict[str, Any], waiting_since: float | None = None
    ) -> dict[str, Any]:
        if event.get("status") == "success":
            self.log.info("Done: %s", event["reason"])
            self._verdict(reached=True, since=waiting_since)
            summary = self._priced(event["summary"])
            self._emit(context, summary)
            return summary
        if event.get("status") == "failure":
            self._verdict(reached=False)
            raise WhatsAppDeliveryFailed(event["reason"])
        if event.get("status") == "timeout":
            self._verdict(reached=False)
            raise AirflowSensorTimeout(self._timeout_explained(event["summary"]))
        raise RuntimeError(f"the status trigger stopped: {event.get('reason')}")


# The method Airflow resumes a deferred task with when the deferral ended in failure (its timeout,
# or a trigger that raised): airflow.sdk.bases.operator.TRIGGER_FAIL_REPR on every supported line.
TRIGGER_FAILED = "__fail__"
TRIGGER_TIMEOUT = "Trigger timeout"  # its error then (airflow.sdk.bases.operator.TriggerFailureReason)


def _utc(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")

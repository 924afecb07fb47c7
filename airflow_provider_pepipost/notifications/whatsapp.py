"""WhatsAppTemplateNotifier: an approved template to on-call phones from an Airflow callback; and
WhatsAppHITLNotifier: Airflow's human-in-the-loop request on the approvers' phones, answered by a tap.

A template, not a session message: on-call phones have rarely written to the business in the last
24 hours, and WhatsApp delivers only templates to them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from airflow.sdk.bases.notifier import BaseNotifier

from airflow_provider_pepipost.approvals import Confirmation, approver_numbers, option_payloads
from airflow_provider_pepipost.connection_form import DEFAULT_CONN_ID
from airflow_provider_pepipost.errors import MessageValidationError, PepipostConfigError, PepipostError
from airflow_provider_pepipost.hooks.pepipost import PepipostHook
from airflow_provider_pepipost.messages import build_all, mask_value, request_body
from airflow_provider_pepipost.numbers import mask_numbers_in
from airflow_provider_pepipost.status.store import open_store
from airflow_provider_pepipost.template_messages import TemplateDefaults, TemplateMessage, build_template_message

if TYPE_CHECKING:
    from airflow.sdk import Context

# The variables of a suggested alert template "airflow_task_alert": "{{1}} failed in {{2}} (run
# {{3}}, try {{4}}). Log: {{5}}". Any template works: pass its own attributes.
DEFAULT_ATTRIBUTES = (
    "{{ ti.task_id }}",
    "{{ dag.dag_id }}",
    "{{ run_id }}",
    "{{ ti.try_number }}",
    "{{ ti.log_url }}",
)
DEFAULT_TIMEOUT = 30.0  # seconds a whole notification may take, every number and retry included
# async_notify's own threads: a slow alert never takes the event loop's default pool, which the
# triggerer's other triggers (the delivery sensor's among them) run their blocking work on.
_NOTIFY_THREADS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="pepipost-notify")


class WhatsAppTemplateNotifier(BaseNotifier):
    """Send an approved WhatsApp template to one or more numbers when a callback fires.

    For ``on_failure_callback``, ``on_success_callback``, ``on_retry_callback`` and deadline
    alerts. Every attribute is a Jinja template rendered from the callback's context (``dag``,
    ``ti``, ``run_id``, ``ti.log_url``...). A failure to notify (a refusal, a missing connection, a
    number that is not one) is logged as an error naming the cause and the masked number; with
    ``raise_on_failure=True`` it is raised as well. A whole notification takes at most
    ``timeout`` seconds, however the vendor throttles. A number on the status store's suppression
    list (it replied STOP, or was opted out) is never messaged, as for campaigns.

    :param recipients: phone numbers (with country code), or one. (templated)
    :param template_name: the approved template. (templated)
    :param attributes: the template's variables, in order. (templated)
    :param language: the approved locale. (templated)
    :param language_policy: ``deterministic`` or ``fallback``, optional.
    :param media_url: an http(s) URL for a media header, with ``media_type``. (templated)
    :param media_type: ``document``, ``image`` or ``video``.
    :param source: WhatsApp source id; default: the connection extra ``source``.
    :param pepipost_conn_id: the Pepipost connection.
    :param raise_on_failure: raise when a message could not be sent (the callback then fails).
    :param timeout: seconds the whole notification may take, every number, retry and Retry-After
        wait included; what is not sent by then is reported as not sent.
    :param respect_opt_outs: skip numbers on the suppression list (logged as a warning). When the
        list cannot be read, nothing is sent and that is reported: a STOP is never risked.
    :param status_store_conn_id: the status store's connection, as for the send operators.
    """

    template_fields: Sequence[str] = ("recipients", "template_name", "attributes", "language", "media_url")

    def __init__(
        self,
        *,
        recipients: str | Sequence[str],
        template_name: str,
        attributes: Sequence[str] = DEFAULT_ATTRIBUTES,
        language: str = "en",
        language_policy: str | None = None,
        media_url: str | None = None,
        media_type: str | None = None,
        source: str | None = None,
        pepipost_conn_id: str = DEFAULT_CONN_ID,
        raise_on_failure: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
        respect_opt_outs: bool = True,
        status_store_conn_id: str | None = None,
    ) -> None:
        super().__init__()
        self.recipients = recipients
        self.template_name = template_name
        self.attributes = list(attributes)
        self.language = language
        self.language_policy = language_policy
        self.media_url = media_url
        self.media_type = media_type
        self.source = source
        self.pepipost_conn_id = pepipost_conn_id
        self.raise_on_failure = raise_on_failure
        self.timeout = timeout
        self.respect_opt_outs = respect_opt_outs
        self.status_store_conn_id = status_store_conn_id

    def messages(self, hook: PepipostHook) -> list[TemplateMessage]:
        """The messages to send, one per number, validated as the template operator validates rows."""
        numbers = [self.recipients] if isinstance(self.recipients, (str, int)) else list(self.recipients)
        # The attributes are rendered already: braces in them (a URL, a JSON error) are text, not
        # the template operator's {field} placeholders.
        attributes = [str(value).replace("{", "{{").replace("}", "}}") for value in self.attributes]
        defaults = TemplateDefaults(
            source=self.source or hook.settings.source,
            template_name=self.template_name,
            language=self.language,
            language_policy=self.language_policy,
            attributes=attributes,
            media_url=self.media_url or None,
            media_type=self.media_type or None,
        )
        try:
            built = build_all(numbers, defaults, build_template_message)
        except MessageValidationError as err:  # the notifier's numbers are a list, not rows of a file
            problems = "; ".join(
                f"recipients[{p.row}] = {p.value}: {p.reason}" if p.field == "recipient_whatsapp" else str(p)
                for p in err.problems
            )
            raise ValueError(problems) from None
        if not built:
            raise ValueError("recipients: is empty")
        return built

    def notify(self, context: Context) -> None:
        deadline = time.monotonic() + self.timeout
        failures: list[str] = []
        hook: PepipostHook | None = None
        try:
            hook = PepipostHook(self.pepipost_conn_id)
            for message in self._not_opted_out(self.messages(hook)):
                shown = mask_value("recipient_whatsapp", message.recipient)
                if time.monotonic() >= deadline:
                    failures.append(f"{shown}: not sent, the notification's {self.timeout:g} s were up")
                    continue
                try:
                    message_id = hook.post_message_body(request_body(message), deadline=deadline)
                except PepipostError as err:
                    failures.append(f"{shown}: {err}")
                    continue
                self.log.info("WhatsApp alert '%s' sent to %s (id %s)", message.template_name, shown, message_id)
        except Exception as err:  # a missing connection, a bad setting: the callback must not crash on it
            failures.append(f"{type(err).__name__}: {err}")
        finally:
            if hook is not None:
                hook.close()
        if failures:
            # The vendor's texts may quote the number: every DAG reader sees this log.
            text = mask_numbers_in(f"WhatsApp alert '{self.template_name}' was NOT sent: " + "; ".join(failures))
            self.log.error(text)
            if self.raise_on_failure:
                raise PepipostError(text)

    def _not_opted_out(self, messages: list[TemplateMessage]) -> list[TemplateMessage]:
        """The messages whose number is not on the suppression list; a store that cannot be read
        raises (the caller reports it), so that no STOP is risked."""
        if not self.respect_opt_outs:
            return messages
        stopped = open_store(self.status_store_conn_id).suppressed([m.recipient for m in messages])
        for message in messages:
            if message.recipient in stopped:
                shown = mask_value("recipient_whatsapp", message.recipient)
                self.log.warning("WhatsApp alert '%s' not sent to %s: the number opted out", self.template_name, shown)
        return [message for message in messages if message.recipient not in stopped]

    async def async_notify(self, context: Context) -> None:
        """The same send on the notifier's own threads: the event loop never waits on the network,
        and a slow alert never holds the threads other triggers need."""
        await asyncio.get_running_loop().run_in_executor(_NOTIFY_THREADS, self.notify, context)


# The variables of a suggested request template "airflow_approval_request": "{{1}}: {{2}}. Open
# in Airflow: {{3}}", approved with one quick-reply button per option (payloads: the options).
DEFAULT_APPROVAL_ATTRIBUTES = ("{{ task.subject }}", "{{ task.body or task.subject }}", "{{ ti.log_url }}")


class WhatsAppHITLNotifier(WhatsAppTemplateNotifier):
    """Ask for a human-in-the-loop decision on WhatsApp; an approver's tap on a button answers the task.

    For the ``notifiers=[...]`` of ``HITLOperator``, ``ApprovalOperator`` and
    ``HITLBranchOperator``. Sends an approved template whose quick-reply buttons stand for the
    task's options (``option_payloads``: option -> the button's payload, by default the option's
    own text) to each approver, and records in the status store which message asks for which try
    of which task instance, with which buttons, of whom. When an approver taps a button, the
    webhook receiver (standalone or the plugin) answers the task through Airflow's REST API (see
    ``webhook.airflow_api``); a tap by anyone else, on a button the request did not have, or on
    an earlier try's request, changes nothing. A number on the suppression list is not asked.

    :param recipients: the approvers' numbers. Keep them out of what a run's conf can change
        (params): whoever triggers the DAG could name themselves. (templated)
    :param template_name: the approved template with one quick-reply button per option. (templated)
    :param attributes: its variables: by default the task's subject, body and the link to the
        task's log in the UI. (templated)
    :param option_payloads: option -> the payload its button was approved with.
    :param confirmation_template: an approved template with one variable (the option taken) that
        tells the approver their answer was taken; None sends none.
    :param confirmation_language: its locale.
    :param raise_on_failure: default True: an approval nobody was asked for fails the task, rather
        than wait for an answer that cannot come.

    Other parameters: as ``WhatsAppTemplateNotifier``'s.
    """

    def __init__(
        self,
        *,
        recipients: str | Sequence[str],
        template_name: str,
        attributes: Sequence[str] = DEFAULT_APPROVAL_ATTRIBUTES,
        option_payloads: Mapping[str, str] | None = None,
        confirmation_template: str | None = None,
        confirmation_language: str = "en",
        raise_on_failure: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            recipients=recipients,
            template_name=template_name,
            attributes=attributes,
            raise_on_failure=raise_on_failure,
            timeout=timeout,
            **kwargs,
        )
        self.option_payloads = dict(option_payloads or {})
        self.confirmation = (
            Confirmation(confirmation_template, confirmation_language, self.pepipost_conn_id)
            if confirmation_template
            else None
        )

    def notify(self, context: Context) -> None:
        task, ti = context["task"], context["ti"]
        options = list(getattr(task, "options", None) or [])
        if not options:
            raise PepipostConfigError(
                f"WhatsAppHITLNotifier is for human-in-the-loop tasks (HITLOperator, ApprovalOperator...); "
                f"task {task.task_id!r} has no options"
            )
        payloads = option_payloads(options, self.option_payloads)
        approvers = approver_numbers(self.recipients)
        map_index = ti.map_index if ti.map_index is not None else -1
        asked = (ti.dag_id, ti.run_id, ti.task_id, map_index, int(ti.try_number or 1))
        store = open_store(self.status_store_conn_id)
        by_payload = {payload: option for option, payload in payloads.items()}

        def record(message_id: str) -> None:  # right after each send: a tap may come at once
            store.record_approval_request(message_id, asked, by_payload, approvers, self.confirmation)

        sent, failures = self._ask(approvers, record)
        if failures or not sent:
            text = mask_numbers_in(
                f"WhatsApp approval request '{self.template_name}' was NOT sent to "
                f"{len(failures) or len(approvers)} approver(s): " + ("; ".join(failures) or "every one opted out")
            )
            self.log.error(text)
            if self.raise_on_failure and not sent:
                raise PepipostError(text)

    def _ask(self, approvers: frozenset[str], record: Callable[[str], None]) -> tuple[list[str], list[str]]:
        """Send the request to each approver not opted out, recording each; the ids, and what failed."""
        deadline = time.monotonic() + self.timeout
        sent: list[str] = []
        failures: list[str] = []
        hook = PepipostHook(self.pepipost_conn_id)
        try:
            self.recipients = sorted(approvers)
            for message in self._not_opted_out(self.messages(hook)):
                shown = mask_value("recipient_whatsapp", message.recipient)
                try:
                    message_id = hook.post_message_body(request_body(message), deadline=deadline)
                except PepipostError as err:
                    failures.append(f"{shown}: {err}")
                    continue
                record(message_id)
                sent.append(message_id)
                self.log.info("WhatsApp approval request '%s' sent to %s (id %s)", self.template_name, shown,
                              message_id)  # fmt: skip
        finally:
            hook.close()
        return sent, failures


def send_whatsapp_template_notification(**kwargs: Any) -> WhatsAppTemplateNotifier:
    """The notifier as Airflow's providers name their notifier factories."""
    return WhatsAppTemplateNotifier(**kwargs)

"""WhatsAppTemplateNotifier: an approved template to on-call phones from an Airflow callback.

A template, not a session message: on-call phones have rarely written to the business in the last
24 hours, and WhatsApp delivers only templates to them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk.bases.notifier import BaseNotifier

from airflow_provider_pepipost.connection_form import DEFAULT_CONN_ID
from airflow_provider_pepipost.errors import PepipostError
from airflow_provider_pepipost.hooks.pepipost import PepipostHook
from airflow_provider_pepipost.messages import build_all, mask_value, request_body
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


class WhatsAppTemplateNotifier(BaseNotifier):
    """Send an approved WhatsApp template to one or more numbers when a callback fires.

    For ``on_failure_callback``, ``on_success_callback``, ``on_retry_callback`` and deadline
    alerts. Every attribute is a Jinja template rendered from the callback's context (``dag``,
    ``ti``, ``run_id``, ``ti.log_url``...). A failure to notify is logged as an error naming the
    cause and the masked number; with ``raise_on_failure=True`` it is raised as well.

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
        built = build_all(numbers, defaults, build_template_message)
        if not built:
            raise ValueError("recipients: is empty")
        return built

    def notify(self, context: Context) -> None:
        hook = PepipostHook(self.pepipost_conn_id)
        failures: list[str] = []
        try:
            for message in self.messages(hook):
                shown = mask_value("recipient_whatsapp", message.recipient)
                try:
                    message_id = hook.post_message_body(request_body(message))
                except PepipostError as err:
                    failures.append(f"{shown}: {err}")
                    continue
                self.log.info("WhatsApp alert '%s' sent to %s (id %s)", message.template_name, shown, message_id)
        except (PepipostError, ValueError) as err:
            failures.append(str(err))
        finally:
            hook.close()
        if failures:
            text = f"WhatsApp alert '{self.template_name}' was NOT sent: " + "; ".join(failures)
            self.log.error(text)
            if self.raise_on_failure:
                raise PepipostError(text)

    async def async_notify(self, context: Context) -> None:
        """The same send in a thread, so that the triggerer's event loop never waits on the network."""
        await asyncio.to_thread(self.notify, context)


def send_whatsapp_template_notification(**kwargs: Any) -> WhatsAppTemplateNotifier:
    """The notifier as Airflow's providers name their notifier factories."""
    return WhatsAppTemplateNotifier(**kwargs)

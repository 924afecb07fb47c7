"""Telling an approver their answer was taken: the request's confirmation template, sent by the receiver.

A template, not a session message: it reaches the approver whatever the 24-hour window says. A
confirmation that cannot be sent is logged (the number masked) and not tried again: the answer
itself was taken.
"""

from __future__ import annotations

import logging
import time

from airflow_provider_pepipost.approvals import Confirmation
from airflow_provider_pepipost.hooks.pepipost import PepipostHook
from airflow_provider_pepipost.messages import request_body
from airflow_provider_pepipost.numbers import mask_number, mask_numbers_in
from airflow_provider_pepipost.template_messages import TemplateDefaults, build_template_message

log = logging.getLogger(__name__)

TIMEOUT = 15.0  # seconds a confirmation may take, retries included


def send_confirmation(confirmation: Confirmation, number: str, option: str) -> str | None:
    """Send the confirmation template (its one variable: ``option``) to ``number``; its message id, or None."""
    try:
        hook = PepipostHook(confirmation.pepipost_conn_id)
    except Exception as err:  # no such connection in the receiver's environment
        log.error("Pepipost approvals: no confirmation sent to %s: %s", mask_number(number), mask_numbers_in(str(err)))
        return None
    try:
        # The option is the body's text, not a {field} placeholder: braces doubled.
        defaults = TemplateDefaults(
            source=hook.settings.source,
            template_name=confirmation.template_name,
            language=confirmation.language,
            attributes=[option.replace("{", "{{").replace("}", "}}")],
        )
        message, problems = build_template_message(number, defaults, 0)
        if message is None:
            raise ValueError("; ".join(str(problem) for problem in problems))
        message_id = hook.post_message_body(request_body(message), deadline=time.monotonic() + TIMEOUT)
    except Exception as err:
        log.error("Pepipost approvals: the confirmation to %s was not sent: %s", mask_number(number),
                  mask_numbers_in(str(err)))  # fmt: skip
        return None
    finally:
        hook.close()
    log.info("Pepipost approvals: confirmation '%s' sent to %s (id %s)", confirmation.template_name,
             mask_number(number), message_id)  # fmt: skip
    return message_id

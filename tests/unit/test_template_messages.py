"""The template message model: the exact vendor body, and every row problem named before sending."""

from __future__ import annotations

import pytest

from airflow_provider_pepipost.errors import MessageValidationError
from airflow_provider_pepipost.messages import idempotency_key, request_body, validate_rows
from airflow_provider_pepipost.template_messages import (
    TemplateDefaults,
    TemplateMessage,
    build_template_message,
)

N = "919800000001"
DEFAULTS = TemplateDefaults(source="<source id>", template_name="invoice_ready", attributes=["{name}", "{invoice}"])


def test_the_body_with_a_media_header_is_exactly_the_vendor_example():
    row = {"recipient_whatsapp": "919999999999", "name": "Asha", "invoice": "INV-1042", "x-apiheader": "<custom data>"}
    defaults = TemplateDefaults(
        source="<source id>",
        template_name="invoice_ready",
        attributes=["{name}", "{invoice}"],
        language_policy="deterministic",
        media_url="https://cdn.example.com/inv-1042.pdf",
        media_type="document",
    )
    message, problems = build_template_message(row, defaults, 0)
    assert problems == []
    vendor_example = {
        "message": [
            {
                "recipient_whatsapp": "919999999999",
                "message_type": "template",
                "recipient_type": "individual",
                "source": "<source id>",
                "x-apiheader": "<custom data>",
                "type_template": [
                    {
                        "name": "invoice_ready",
                        "attributes": ["Asha", "INV-1042"],
                        "language": {"locale": "en", "policy": "deterministic"},
                    }
                ],
                "type_media_template": {"type": "document", "url": "https://cdn.example.com/inv-1042.pdf"},
            }
        ]
    }
    assert request_body(message) == vendor_example


def test_the_body_without_header_variables_or_policy_holds_no_empty_keys():
    message = TemplateMessage("919999999999", "src", "spring_offer", ttl=2)
    assert request_body(message) == {
        "message": [
            {
                "recipient_whatsapp": "919999999999",
                "message_type": "template",
                "recipient_type": "individual",
                "source": "src",
                "ttl": 2,
                "type_template": [{"name": "spring_offer", "language": {"locale": "en"}}],
            }
        ]
    }


@pytest.mark.parametrize(
    ("row", "field", "reason"),
    [
        ({"recipient_whatsapp": N, "name": "A"}, "attributes[1]", "placeholder {invoice} has no value"),
        ({"recipient_whatsapp": N, "name": "A", "invoice": "I", "template_name": " "}, "template_name", ""),
        ({"recipient_whatsapp": N, "attributes": ["x", ""]}, "attributes[1]", "is empty"),
        ({"recipient_whatsapp": N, "attributes": "x"}, "attributes", "must be a list"),
        ({"recipient_whatsapp": N, "attributes": [], "media_type": "sticker"}, "media_type", "header"),
        ({"recipient_whatsapp": N, "attributes": [], "media_url": "ftp://x", "media_type": "image"}, "media_url", "URL"),  # noqa: E501
        ({"recipient_whatsapp": N, "attributes": [], "ttl": 1.5}, "ttl", "whole number"),
        ({"recipient_whatsapp": N, "attributes": [], "ttl": 0}, "ttl", "at least 1"),
        ({"recipient_whatsapp": N, "attributes": [], "language_policy": "any"}, "language_policy", "one of"),
        ({"recipient_whatsapp": "12345", "attributes": []}, "recipient_whatsapp", "digits"),
        ({"recipient_whatsapp": N, "attributes": ["a\x00b"]}, "attributes[0]", "NUL"),
    ],
)  # fmt: skip
def test_row_problems_name_the_row_and_the_field(row, field, reason):
    message, problems = build_template_message(row, DEFAULTS, 7)
    assert message is None
    assert any(p.row == 7 and p.field == field and reason in p.reason for p in problems), problems


def test_every_row_is_checked_before_anything_is_sent():
    rows = [{"recipient_whatsapp": "919800000001", "name": "A", "invoice": "1"}, {"recipient_whatsapp": "x"}]
    with pytest.raises(MessageValidationError, match="row 1, field 'recipient_whatsapp'"):
        validate_rows(rows, DEFAULTS, build_template_message)


def test_the_key_covers_what_the_recipient_sees():
    def key(**change):
        message = TemplateMessage("919800000001", "src", "invoice_ready", attributes=("A", "1"))
        message = TemplateMessage(**{**{f: getattr(message, f) for f in message.__slots__}, **change})
        return idempotency_key("campaign", message.recipient, message.identity())

    base = key()
    for change in (
        {"attributes": ("A", "2")},
        {"template_name": "spring_offer"},
        {"language": "pt_BR"},
        {"media_url": "https://x/a.pdf", "media_type": "document"},
    ):
        assert key(**change) != base, change

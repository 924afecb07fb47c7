"""The pure message model: validation rules, error reporting, and the exact vendor body."""

from __future__ import annotations

import dataclasses

import pytest

from airflow_provider_pepipost.errors import MessageValidationError
from airflow_provider_pepipost.messages import (
    MediaMessage,
    MessageDefaults,
    build_message,
    default_campaign_key,
    idempotency_key,
    iter_messages,
    normalize_phone,
    request_body,
    validate_rows,
)

DEFAULTS = MessageDefaults(source="src-1", attachment_id="media-1", caption="Hello")


def test_body_is_exactly_the_vendor_example():
    message = MediaMessage(
        recipient_whatsapp="919833078369",
        source="fa9d647a-c8d7-423e-bd27-7d2ca2875dc1",
        recipient_type="individual",
        attachment_id="1fc380aa-6953-4e95-aef9-f220a22d51a3",
        caption="yourdocumentcaption",
        api_header="Your_unique_identifier",
    )
    assert request_body(message) == {
        "message": [
            {
                "recipient_whatsapp": "919833078369",
                "message_type": "media",
                "recipient_type": "individual",
                "source": "fa9d647a-c8d7-423e-bd27-7d2ca2875dc1",
                "x-apiheader": "Your_unique_identifier",
                "type_media": [
                    {
                        "attachments": [
                            {"attachment_id": "1fc380aa-6953-4e95-aef9-f220a22d51a3", "caption": "yourdocumentcaption"}
                        ]
                    }
                ],
            }
        ]
    }


def test_body_by_url_and_without_caption():
    message = MediaMessage("447900000001", "s", attachment_url="https://x.test/a.mp4", attachment_type="video")
    attachment = message.to_payload()["type_media"][0]["attachments"][0]
    assert attachment == {"attachment_url": "https://x.test/a.mp4", "attachment_type": "video"}
    assert "x-apiheader" not in message.to_payload()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("+91 98330-78369", "919833078369"),
        ("(44) 7900 000001", "447900000001"),
        (919833078369, "919833078369"),
        ("123456789012345", "123456789012345"),
    ],
)
def test_phone_numbers_are_normalized(raw, expected):
    assert normalize_phone(raw) == expected


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("98330783", "has 8 digits"),
        ("1234567890123456", "has 16 digits"),
        ("+91 98330 7836x", "only digits"),
        ("", "is empty"),
        (True, "must be a phone number"),
        (12.5, "must be a phone number"),
    ],
)
def test_bad_phone_numbers_say_why(raw, reason):
    with pytest.raises(ValueError, match=reason):
        normalize_phone(raw)


def test_row_values_win_over_defaults_and_placeholders_fill_from_the_row():
    row = {"recipient_whatsapp": "919833078369", "caption": "Hi {name}!", "name": "Asha", "source": "src-2"}
    message, problems = build_message(row, DEFAULTS, 0)
    assert problems == []
    assert message.caption == "Hi Asha!"
    assert message.source == "src-2"
    assert message.attachment_id == "media-1"


def test_a_row_attachment_url_replaces_the_default_attachment_id():
    row = {
        "recipient_whatsapp": "919833078369",
        "attachment_url": "https://x.test/a.pdf",
        "attachment_type": "document",
    }
    message, problems = build_message(row, DEFAULTS, 0)
    assert problems == []
    assert message.attachment_id is None
    assert message.attachment_url == "https://x.test/a.pdf"


def test_group_recipients_need_no_phone_format():
    message, problems = build_message({"recipient_whatsapp": "group-abc@g.us", "recipient_type": "group"}, DEFAULTS, 0)
    assert problems == []
    assert message.to_payload()["recipient_type"] == "group"


def test_every_problem_of_every_row_is_reported_at_once():
    rows = [
        "919833078369",
        {"recipient_whatsapp": "12345", "caption": "Hi {missing}"},
        {"recipient_whatsapp": "919833078369", "attachment_url": "ftp://x", "attachment_type": "gif"},
        {"recipient_whatsapp": "919833078369", "recipient_type": "channel"},
        42.0,
    ]
    with pytest.raises(MessageValidationError) as caught:
        validate_rows(rows, DEFAULTS)
    found = {(p.row, p.field) for p in caught.value.problems}
    assert found == {
        (1, "recipient_whatsapp"),
        (1, "caption"),
        (2, "attachment_url"),
        (2, "attachment_type"),
        (3, "recipient_type"),
        (4, "row"),
    }
    text = str(caught.value)
    assert "row 1, field 'recipient_whatsapp'" in text
    assert "nothing was sent" in text
    assert "placeholder {missing} has no value in this row" in text


def test_missing_source_and_attachment_name_the_fix():
    with pytest.raises(MessageValidationError) as caught:
        validate_rows(["919833078369"], MessageDefaults())
    text = str(caught.value)
    assert "field 'source'" in text and "connection extra 'source'" in text
    assert "field 'attachment_id'" in text


def test_phone_numbers_are_masked_in_errors():
    with pytest.raises(MessageValidationError) as caught:
        validate_rows(["+91 9833 0783 6999 1234"], DEFAULTS)
    assert "9833 0783 6999" not in str(caught.value)


def test_placeholders_allow_no_attribute_access():
    _, problems = build_message({"recipient_whatsapp": "919833078369", "caption": "{name.__class__}"}, DEFAULTS, 0)
    assert problems and problems[0].field == "caption"


def test_caption_length_is_capped():
    _, problems = build_message({"recipient_whatsapp": "919833078369", "caption": "x" * 1025}, DEFAULTS, 0)
    assert [p.field for p in problems] == ["caption"]


def test_the_error_message_lists_a_bounded_number_of_problems():
    rows = ["1"] * 500
    with pytest.raises(MessageValidationError) as caught:
        validate_rows(iter(rows), DEFAULTS)
    assert caught.value.total_problems == 500
    assert len(caught.value.problems) == MessageValidationError.SHOWN
    assert "and 450 more" in str(caught.value)


def test_validate_counts_rows_and_iter_messages_keeps_order():
    rows = [f"9198330783{i:02d}" for i in range(12)]
    assert validate_rows(rows, DEFAULTS) == 12
    assert [m.recipient_whatsapp for _, m in iter_messages(rows, DEFAULTS, build_message)] == rows


def test_idempotency_key_is_stable_and_distinct():
    campaign = default_campaign_key("dag", "run", "task")
    message = MediaMessage("919833078369", "src", attachment_id="media-1", caption="Hi")
    key = idempotency_key(campaign, message.recipient, message.identity())
    assert key == idempotency_key(campaign, message.recipient, message.identity())
    assert key != idempotency_key(default_campaign_key("dag", "run-2", "task"), message.recipient, message.identity())
    assert key.startswith("af-") and len(key) == 35


@pytest.mark.parametrize(
    "change",
    [
        {"attachment_id": "media-2"},
        {"caption": "Hello"},
        {"caption": None},
        {"caption": ""},
        {"source": "other-source"},
        {"attachment_id": None, "attachment_url": "https://x.example/a.pdf", "attachment_type": "document"},
    ],
)
def test_the_key_covers_everything_the_recipient_sees(change):
    message = MediaMessage("919833078369", "src", attachment_id="media-1", caption="Hi")
    other = dataclasses.replace(message, **change)
    assert message.identity() != other.identity()
    assert idempotency_key("c", message.recipient, message.identity()) != idempotency_key(
        "c", other.recipient, other.identity()
    )

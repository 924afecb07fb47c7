"""Parsing webhook bodies: v1 and v2 delivery reports, inbound replies, malformed items kept aside."""

from __future__ import annotations

import pytest

from airflow_provider_pepipost.webhook.payload import parse_body, parse_time

V1_ITEM = {
    "ncmessage_id": "fa9d-5d12",
    "recipient": "919999999999",
    "status": "read",
    "status_remark": "",
    "received_at": "2019-05-16 15:36:58",
    "source": "fa9d-5dc1",
}
V2_ITEM = {
    **V1_ITEM,
    "received_at": "1558021018",
    "x-apiheader": "af-123",
    "phoneNumber": "919000000000",
    "pricing": {"billable": True, "category": "service", "pricing_model": "CBP", "type": "regular"},
}


def test_v1_and_v2_items_parse_to_the_same_event():
    v1 = parse_body({"delivery_status": [V1_ITEM]}).events[0]
    v2 = parse_body({"delivery_status": [V2_ITEM]}).events[0]
    assert (v1.message_id, v1.status, v1.reported_at) == ("fa9d-5d12", "read", 1558021018.0)
    assert (v2.message_id, v2.status, v2.reported_at, v2.api_header) == ("fa9d-5d12", "read", 1558021018.0, "af-123")
    assert v1.api_header is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1558021018, 1558021018.0),
        ("1558021018", 1558021018.0),
        (1558021018123, 1558021018.123),
        (None, None),
        ("", None),
    ],
)
def test_times(value, expected):
    assert parse_time(value) == pytest.approx(expected) if expected else parse_time(value) is None


def test_malformed_items_are_kept_with_a_reason_and_the_rest_stored():
    body = {
        "delivery_status": [
            V1_ITEM,
            "not an object",
            {"status": "read"},
            {"ncmessage_id": "x", "status": ["read"]},
            {"ncmessage_id": "y", "status": "read", "received_at": "yesterday"},
            {"ncmessage_id": "z" * 200, "status": "read"},
        ]
    }
    batch = parse_body(body)
    assert [e.message_id for e in batch.events] == ["fa9d-5d12"]
    reasons = [reason for reason, _ in batch.rejected]
    assert reasons[0].startswith("delivery_status[1]: item must be an object")
    assert "'ncmessage_id' is missing" in reasons[1]
    assert "'status' must be a string" in reasons[2]
    assert "received_at" in reasons[3]
    assert "longer than 128" in reasons[4]


def test_inbound_messages_are_not_delivery_reports():
    body = {
        "incoming_message": [
            {"message_id": "in-1", "from": "919999999999", "received_at": "1", "context": {"ncmessage_id": "m1"}}
        ]
    }
    batch = parse_body(body)
    assert batch.events == [] and batch.rejected == []
    assert batch.inbound[0]["context_message_id"] == "m1"


@pytest.mark.parametrize("body", [[], "text", 3, {"other": []}, {"delivery_status": {"a": 1}}])
def test_bodies_of_the_wrong_shape_are_rejected_whole(body):
    batch = parse_body(body)
    assert batch.events == [] and len(batch.rejected) == 1

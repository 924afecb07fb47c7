"""Parsing webhook bodies: v1 and v2 delivery reports, inbound replies, malformed items kept aside."""

from __future__ import annotations

import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airflow_provider_pepipost import limits
from airflow_provider_pepipost.status import schema
from airflow_provider_pepipost.webhook import payload
from airflow_provider_pepipost.webhook.payload import MAX_ITEM_LETTERS, body_key, parse_body, parse_time

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
    reasons = [dead.reason for dead in batch.dead_letters]
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
    assert batch.events == [] and batch.dead_letters == []
    assert batch.inbound[0].context_message_id == "m1"


@pytest.mark.parametrize("body", [[], "text", 3, {"other": []}, {"delivery_status": {"a": 1}}])
def test_bodies_of_the_wrong_shape_are_dead_letters_whole(body):
    batch = parse_body(body)
    assert batch.events == [] and len(batch.dead_letters) == 1


# -- what the store's columns hold (issue 11, point 1) --------------------------------------------


def _item(**fields):
    return {"ncmessage_id": "m1", "status": "read", "received_at": "1700000000", **fields}


@pytest.mark.parametrize(
    ("item", "reason"),
    [
        (_item(recipient="9" * 65), "'recipient' is longer than 64"),
        (_item(status="s" * 33), "'status' is longer than 32"),
        (_item(ncmessage_id="m\x00"), "NUL"),
        (_item(status_remark="gone\x00"), "NUL"),
        (_item(recipient="91\x0099"), "NUL"),
        (_item(ignored="\ud800"), "lone surrogate"),
        (_item(**{"x-apiheader": "h\udfff"}), "lone surrogate"),
        (_item(received_at=float("inf")), "not a finite number"),
        (_item(received_at="Infinity"), "not a finite number"),
        (_item(received_at="NaN"), "not a finite number"),
        (_item(received_at=10**400), "out of range"),
        (_item(received_at=1e300), "outside"),
        (_item(received_at=-5), "outside"),
    ],
    ids=str.split(
        "recipient-65 status-33 nul-id nul-remark nul-recipient surrogate-ignored surrogate-header inf "
        "infinity-text nan-text 10**400 1e300 negative"
    ),
)
def test_values_the_store_cannot_hold_are_dead_letters_with_a_reason(item, reason):
    batch = parse_body({"delivery_status": [_item(ncmessage_id="good"), item]})
    assert [e.message_id for e in batch.events] == ["good"]
    assert len(batch.dead_letters) == 1 and reason in batch.dead_letters[0].reason, batch.dead_letters
    dead_reason, raw = batch.dead_letters[0].reason, batch.dead_letters[0].raw
    assert limits.text_problem(dead_reason) is None and limits.text_problem(raw) is None  # storable


def test_every_value_the_parser_accepts_fits_its_column():
    longest = _item(
        ncmessage_id="m" * limits.MESSAGE_ID_MAX,
        status="s" * limits.STATUS_MAX,
        recipient="9" * limits.RECIPIENT_MAX,
        **{"x-apiheader": "h" * limits.API_HEADER_MAX},
    )
    event = parse_body({"delivery_status": [longest]}).events[0]
    columns = schema.events.c
    for column, value in [
        (columns.message_id, event.message_id),
        (columns.status, event.status),
        (columns.raw_status, event.raw_status),
        (columns.recipient, event.recipient),
        (columns.api_header, event.api_header),
    ]:
        assert len(value) <= column.type.length, column
    assert schema.ledger.c.recipient.type.length == limits.RECIPIENT_MAX


def test_a_body_of_junk_makes_a_bounded_number_of_dead_letters():
    batch = parse_body({"delivery_status": [1] * 200_000 + [_item()]}, key=body_key(b"junk"))
    assert len(batch.events) == 1
    assert len(batch.dead_letters) == MAX_ITEM_LETTERS + 1 and batch.dead_letter_items == 200_000
    assert "199980 more items could not be read, the first at delivery_status[20]" in batch.dead_letters[-1].reason
    assert len(batch.dead_letters[-1].raw) <= limits.RAW_MAX


def test_dead_letter_keys_follow_the_body_so_a_replay_adds_none():
    body = {"delivery_status": [7, {"status": "read"}]}
    first = parse_body(body, key=body_key(b"one body")).dead_letters
    again = parse_body(body, key=body_key(b"one body")).dead_letters
    other = parse_body(body, key=body_key(b"another body")).dead_letters
    assert [dead.key for dead in first] == [dead.key for dead in again]
    assert len({dead.key for dead in first}) == 2 and not {dead.key for dead in first} & {dead.key for dead in other}


# Texts with what the store cannot hold, what only looks like it, and what is fine.
_awkward_text = st.text(
    alphabet=st.sampled_from(["a", "9", " ", "\\", "u", "0", "\x00", "\ud800", "\udfff", "é", '"', "\n"]), max_size=12
)
_field_value = st.one_of(
    st.none(), _awkward_text, st.integers(-10, 10**12), st.booleans(), st.lists(_awkward_text, max_size=2)
)


@settings(max_examples=400, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["ncmessage_id", "status", "status_remark", "x-apiheader", "recipient", "other", "\x00key"]),
        _field_value,
    ),
    st.booleans(),
)
def test_the_one_look_at_an_items_json_decides_as_every_fields_own_check_would(item, huge):
    """``parse_delivery_item`` skips each field's NUL and surrogate checks when the item's JSON shows
    none anywhere: on any item it accepts and refuses what the checks of every field decide."""
    if huge:  # the fields past the raw text kept (cut at MAX_RAW_CHARS): looked at all the same
        item = {"padding": "p" * payload.MAX_RAW_CHARS, **item}

    def outcome() -> object:
        try:
            return payload.parse_delivery_item(item)
        except ValueError as err:
            return f"refused: {err}"

    fast = outcome()
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(payload, "_raw_and_clean", lambda it: (payload._raw(it), False))
        assert outcome() == fast


def test_an_item_nested_too_deeply_to_show_is_stored_or_set_apart_as_any_other():
    """Deeper than JSON or ``repr`` can walk: its raw text is a note saying so, and the rest is read."""
    nested: list = []
    for _ in range(5 * sys.getrecursionlimit()):  # built by a loop: deeper than any recursion can walk
        nested = [nested]
    deep = {"ncmessage_id": "deep", "status": "read", "x": nested}
    no_id = {"status": "read", "x": nested}
    deep_remark = {"ncmessage_id": "r", "status": "failed", "status_remark": nested}  # its text is its repr
    batch = parse_body({"delivery_status": [_item(ncmessage_id="good"), deep, no_id, deep_remark]})
    assert [e.message_id for e in batch.events] == ["good", "deep"]
    assert batch.events[1].raw == "<a dict nested too deeply to show>"
    reasons = [letter.reason for letter in batch.dead_letters]
    assert reasons == ["delivery_status[2]: 'ncmessage_id' is missing", "delivery_status[3]: item nested too deeply"]
    assert {letter.raw for letter in batch.dead_letters} == {"<a dict nested too deeply to show>"}

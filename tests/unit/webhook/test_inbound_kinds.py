"""Every kind of customer message is read into its dataclass (text, button, media, location), and a
kind the provider does not know is kept; through the real receiver into the store (SQLite and
PostgreSQL), each is linked to the send task row whose message it answers."""

from __future__ import annotations

import pytest
import requests

from airflow_provider_pepipost.status.inbound import ButtonReply, InboundMessage, LocationReply, MediaReply, TextReply
from airflow_provider_pepipost.status.ledger import Claim, Outcome, TaskKey
from airflow_provider_pepipost.status.store import StatusStore
from airflow_provider_pepipost.webhook.payload import parse_body
from tests.conftest import WEBHOOK_TOKEN

SENDER = "919800000001"


def incoming(message_type: str | None, replied_to: str | None = "sent-1", **kind_fields) -> dict:
    item = {"message_id": f"in-{message_type}", "from": f"+91 {SENDER[2:7]} {SENDER[7:]}",
            "received_at": "1700000000", "context": {"ncmessage_id": replied_to}, **kind_fields}  # fmt: skip
    if message_type is not None:
        item["message_type"] = message_type
    return item


KINDS = [
    (incoming("TEXT", text_type={"text": "Yes, book it"}), TextReply, {"text": "Yes, book it"}),
    (incoming("button", text_type={"payload": "BOOK_YES", "text": "Yes, book it"}), ButtonReply,
     {"payload": "BOOK_YES", "text": "Yes, book it"}),
    (incoming("BUTTON", button={"payload": "LATER", "text": "Not now"}), ButtonReply,
     {"payload": "LATER", "text": "Not now"}),
    (incoming("IMAGE", image_type={"id": "media-77", "caption": "my receipt"}), MediaReply,
     {"media_id": "media-77", "caption": "my receipt"}),
    (incoming("document", document={"media_id": "media-78"}), MediaReply, {"media_id": "media-78", "caption": None}),
    (incoming("LOCATION", location_type={"latitude": "19.07", "longitude": 72.87}), LocationReply,
     {"latitude": 19.07, "longitude": 72.87}),
    (incoming("location", location_type={"latitude": "north", "longitude": 999}), LocationReply,
     {"latitude": None, "longitude": None}),
    (incoming("reaction", reaction={"emoji": "+1"}), InboundMessage, {"kind": "reaction"}),
    (incoming(None, replied_to=None), InboundMessage, {"kind": "unknown", "context_message_id": None}),
]  # fmt: skip


@pytest.mark.parametrize(
    ("item", "kind", "fields"), KINDS, ids=[f"{k.__name__}-{i}" for i, (_, k, _) in enumerate(KINDS)]
)
def test_each_kind_of_customer_message_is_read_into_its_dataclass(item, kind, fields):
    batch = parse_body({"incoming_message": [item]})
    assert batch.dead_letters == [] and len(batch.inbound) == 1
    (message,) = batch.inbound
    assert type(message) is kind
    assert message.sender == SENDER and message.message_id == item["message_id"]
    for name, value in fields.items():
        assert getattr(message, name) == value, (name, message)


def test_a_button_whose_text_is_a_stop_word_opts_its_sender_out():
    tapped = incoming("button", text_type={"payload": "UNSUB", "text": "STOP"})
    assert parse_body({"incoming_message": [tapped]}).inbound[0].opt_out == "STOP"
    photo = incoming("image", image_type={"id": "m", "caption": "STOP"})  # only words the customer typed or tapped
    assert parse_body({"incoming_message": [photo]}).inbound[0].opt_out is None


def test_replies_are_filed_with_their_kind_and_linked_to_the_row_they_answer(receiver, store_url):
    store = StatusStore(store_url)
    send = TaskKey("offers", "run-1", "send_offer", 2)
    store.write_ledger(send, [Claim("k5", "k5", SENDER, 5)], [Outcome("k5", "accepted", message_id="sent-1")],
                       attempt="a")  # fmt: skip
    body = {"incoming_message": [item for item, _, _ in KINDS]}
    answer = requests.post(receiver.webhook_url, json=body, headers={"X-Pepipost-Token": WEBHOOK_TOKEN}, timeout=10)
    assert answer.status_code == 200 and answer.json()["inbound"] == len(KINDS), answer.text
    with store.engine.connect() as conn:
        from airflow_provider_pepipost.status import schema

        ids = dict(conn.execute(schema.inbound_messages.select().with_only_columns(
            schema.inbound_messages.c.message_id, schema.inbound_messages.c.id)).all())  # fmt: skip
    button = store.reply(ids["in-button"])
    assert (button.kind, button.button_payload, button.text, button.sender) == ("button", "BOOK_YES", "Yes, book it",
                                                                                   SENDER)  # fmt: skip
    answered = button.in_reply_to
    assert answered is not None
    assert (answered.dag_id, answered.run_id, answered.task_id, answered.map_index, answered.row) == (
        "offers", "run-1", "send_offer", 2, 5
    )  # fmt: skip
    image = store.reply(ids["in-IMAGE"])
    assert (image.kind, image.media_id, image.text) == ("image", "media-77", "my receipt")
    place = store.reply(ids["in-LOCATION"])
    assert (place.latitude, place.longitude) == (19.07, 72.87)
    assert store.reply(ids["in-None"]).in_reply_to is None  # it answers nothing the provider sent
    assert store.reply(ids["in-reaction"]).kind == "reaction"
    assert store.reply(10**9) is None

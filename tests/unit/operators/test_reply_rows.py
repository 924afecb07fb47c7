"""A send row that names a customer message (``inbound_id``) goes to the number that wrote it,
read from the status store: the follow-up to a tap never needs the number in XCom."""

from __future__ import annotations

import json

from airflow_provider_pepipost.operators.whatsapp import SendWhatsAppTemplateOperator
from airflow_provider_pepipost.status.inbound import ButtonReply
from airflow_provider_pepipost.status.store import StatusStore
from airflow_provider_pepipost.version_compat import AirflowFailException
from tests.helpers import run_operator

TAPPER = "919800000555"


def test_rows_that_name_a_reply_go_to_its_sender_and_a_bad_one_fails_naming_field_and_row(
    sandbox, sqlite_url, pepipost_conn
):
    pepipost_conn(sandbox.url, sqlite_url)
    store = StatusStore(sqlite_url)
    store.ingest([], inbound=[ButtonReply("button", TAPPER, "sent-9", json.dumps({"tap": 1}), payload="YES_BOOK")])
    (tap,) = [reply.inbound_id for reply in store.replies_after(0, 10)]

    ids, ti = run_operator([{"inbound_id": tap}], operator_class=SendWhatsAppTemplateOperator,
                           template_name="spring_offer", language="en", attributes=["friend"])  # fmt: skip
    assert len(ids) == 1, ids
    (accepted,) = sandbox.state.accepted
    assert accepted["body"]["message"][0]["recipient_whatsapp"] == TAPPER
    assert TAPPER not in json.dumps(ti.xcom)  # what the task wrote to XCom holds the masked number only

    for row, problem in ((tap + 1000, "no customer message with this id"), ("x1", "is not a customer message's id")):
        rows = [{"inbound_id": tap}, {"inbound_id": row}]
        failed, _ = run_operator(rows, operator_class=SendWhatsAppTemplateOperator, template_name="spring_offer",
                                 language="en", attributes=["friend"])  # fmt: skip
        assert isinstance(failed, AirflowFailException), failed
        assert "row 1, field 'inbound_id'" in str(failed) and problem in str(failed)
    assert sandbox.state.accepted_count == 1  # a bad row stops the task before any send

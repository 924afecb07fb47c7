"""Stop words in replies, through the real receiver: the sender lands on the suppression list."""

from __future__ import annotations

import pytest

from airflow_provider_pepipost.consent import is_stop_reply, normalize_reply, stop_word_set
from airflow_provider_pepipost.status.store import StatusStore
from airflow_provider_pepipost.webhook.app import create_app
from tests.conftest import WEBHOOK_TOKEN
from tests.helpers import ServedApp
from tests.unit.webhook.test_app import post


def text_reply(sender: str, text: str, reply_id: str) -> dict:
    return {"message_id": reply_id, "from": sender, "received_at": "1700000000", "message_type": "TEXT",
            "text_type": {"text": text}, "context": {"ncmessage_id": None, "message_id": None}}  # fmt: skip


@pytest.mark.parametrize("text", ["STOP", "stop", " Stop ", "STOP ALL", "stop  all", "Unsubscribe.", "stop!"])
def test_the_default_stop_words_match_without_case_spaces_or_punctuation(text):
    assert is_stop_reply(text, stop_word_set())


@pytest.mark.parametrize("text", ["stop please", "don't stop", "STOPPED", "", "S T O P x", None, 42])
def test_other_replies_are_not_stop_words(text):
    assert not is_stop_reply(text, stop_word_set())


def test_a_stop_reply_through_the_receiver_suppresses_its_sender_once(receiver, store_url):
    body = {"incoming_message": [text_reply("919800000001", "Stop", "r1"), text_reply("919800000002", "Thanks!", "r2")]}
    first = post(receiver.webhook_url, body).json()
    assert (first["inbound"], first["opt_outs"]) == (2, 1)
    assert post(receiver.webhook_url, body).json()["opt_outs"] == 0  # the same body again
    store = StatusStore(store_url)
    assert store.suppressed(["919800000001", "919800000002"]) == {"919800000001"}


def test_the_stop_words_are_the_operators_to_set(sqlite_url, monkeypatch):
    monkeypatch.setenv("PEPIPOST_STOP_WORDS", "ARRÊT, basta")
    with ServedApp(create_app(sqlite_url, WEBHOOK_TOKEN)) as served:
        body = {
            "incoming_message": [text_reply("919800000001", "arrêt", "r1"), text_reply("919800000002", "STOP", "r2")]
        }
        assert post(f"{served.url}/pepipost/webhook", body).json()["opt_outs"] == 1
    assert StatusStore(sqlite_url).suppressed(["919800000001", "919800000002"]) == {"919800000001"}
    assert normalize_reply(" arrêt ") == "ARRÊT"


def test_an_empty_stop_word_list_is_refused_at_start():
    with pytest.raises(ValueError, match="stop words"):
        create_app("sqlite://", WEBHOOK_TOKEN, stop_words=" , ")

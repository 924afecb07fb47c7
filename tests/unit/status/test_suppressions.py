"""The suppression list and the consent calls in the store, on SQLite and PostgreSQL."""

from __future__ import annotations

from airflow_provider_pepipost.status.consent import ConsentBatch
from airflow_provider_pepipost.status.inbound import InboundMessage
from airflow_provider_pepipost.status.ledger import TaskKey
from airflow_provider_pepipost.status.store import StatusStore

TASK = TaskKey("consent_dag", "run-1", "opt_in")


def reply(sender: str, text: str, opt_out: str | None) -> InboundMessage:
    return InboundMessage("text", sender, None, f'{{"from":"{sender}","text":"{text}"}}', opt_out=opt_out)


def test_a_stop_reply_suppresses_and_a_later_opt_in_lifts_it(store_url):
    store = StatusStore(store_url)
    result = store.ingest([], inbound=[reply("919800000001", "STOP", "STOP"), reply("919800000002", "hi", None)])
    assert (result.inbound, result.opt_outs) == (2, 1)
    assert store.suppressed(["919800000001", "919800000002", "919800000003"]) == {"919800000001"}
    assert store.reply_opt_outs() == ["919800000001"]

    held = store.consents(["919800000001"])  # read after the STOP: an opt-in given anew
    store.record_consent_batch(TASK, ConsentBatch("cb-1", "optin", 1, "confirmed"), ["919800000001"], held)
    assert store.suppressed(["919800000001"]) == set()
    assert store.reply_opt_outs() == []  # opted back in: nothing to pass on


def test_the_same_stop_reply_posted_again_does_not_undo_a_later_opt_in(store_url):
    store = StatusStore(store_url)
    stop = reply("919800000001", "STOP", "STOP")
    store.ingest([], inbound=[stop])
    held = store.consents(["919800000001"])
    store.record_consent_batch(TASK, ConsentBatch("cb-1", "optin", 1, "confirmed"), ["919800000001"], held)
    again = store.ingest([], inbound=[stop])  # the vendor posts the same body again
    assert again.opt_outs == 0
    assert store.suppressed(["919800000001"]) == set()
    store.ingest([], inbound=[reply("919800000001", "stop!", "STOP")])  # a new reply: out again
    assert store.suppressed(["919800000001"]) == {"919800000001"}


def test_a_refused_batch_changes_nobody_and_a_confirmed_opt_out_suppresses(store_url):
    store = StatusStore(store_url)
    store.record_consent_batch(TASK, ConsentBatch("cb-1", "optout", 2, "refused", "8006", "bad"), ["919800000001"])
    assert store.suppressed(["919800000001"]) == set()
    store.record_consent_batch(TASK, ConsentBatch("cb-2", "optout", 1, "confirmed"), ["919800000002"])
    assert store.suppressed(["919800000001", "919800000002"]) == {"919800000002"}
    batches = store.consent_batches(TASK)
    assert {key: b.state for key, b in batches.items()} == {"cb-1": "refused", "cb-2": "confirmed"}
    assert batches["cb-1"].error_message == "bad"
    assert store.consent_batches(TaskKey("consent_dag", "run-2", "opt_in")) == {}


def test_synced_reply_opt_outs_are_passed_on_once(store_url):
    store = StatusStore(store_url)
    store.ingest([], inbound=[reply(f"91980000000{i}", "STOP", "STOP") for i in range(3)])
    assert len(store.reply_opt_outs()) == 3
    store.mark_reply_opt_outs_synced(["919800000000", "919800000001"])
    assert store.reply_opt_outs() == ["919800000002"]
    assert len(store.suppressed([f"91980000000{i}" for i in range(3)])) == 3  # still suppressed


def test_many_numbers_are_looked_up_in_chunks(store_url):
    store = StatusStore(store_url)
    numbers = [f"9198{i:08d}" for i in range(12_000)]
    store.record_opt_outs(numbers[::3], via="consent_api", detail="bulk")
    assert store.suppressed(numbers) == set(numbers[::3])


def test_a_stop_that_arrives_while_the_opt_in_is_with_the_vendor_is_never_undone(store_url):
    store = StatusStore(store_url)
    numbers = ["919800000001", "919800000002", "919800000003"]
    store.record_opt_outs(["919800000003"], via="reply", detail="replied 'STOP'")  # an old STOP
    held = store.consents(numbers)  # the batch is read...
    store.ingest([], inbound=[reply("919800000001", "STOP", "STOP")])  # ...a STOP comes while it is away...
    store.record_opt_outs(["919800000002"], via="consent_api", detail="another task")
    changed = store.record_consent_batch(TASK, ConsentBatch("cb-1", "optin", 3, "confirmed"), numbers, held)
    # ...and the confirmation records the opt-in only where nothing changed since the read: the
    # old opt-out (read with the batch, so lift_opt_outs chose to lift it) is lifted.
    assert changed == {"919800000001", "919800000002"}
    assert store.suppressed(numbers) == {"919800000001", "919800000002"}
    assert store.reply_opt_outs() == ["919800000001"]  # still to be passed on to the vendor


def test_a_stop_from_a_number_opted_in_earlier_wins_over_a_new_opt_in_that_is_with_the_vendor(store_url):
    store = StatusStore(store_url)
    numbers = ["919800000001", "919800000002"]
    store.record_consent_batch(TASK, ConsentBatch("cb-0", "optin", 2, "confirmed"), numbers, store.consents(numbers))
    held = store.consents(numbers)  # a new opt-in batch is read: both rows exist, opted in
    assert {number: consent.opted_out for number, consent in held.items()} == dict.fromkeys(numbers, False)
    store.ingest([], inbound=[reply("+91 98000 00001", "STOP", "STOP")])  # ...a STOP comes while it is away
    assert store.consents(numbers)["919800000001"].opted_out is True
    changed = store.record_consent_batch(TASK, ConsentBatch("cb-1", "optin", 2, "confirmed"), numbers, held)
    assert changed == {"919800000001"}  # the row changed since the read: the opt-in is not recorded
    assert store.suppressed(numbers) == {"919800000001"}
    assert store.reply_opt_outs() == ["919800000001"]  # still to be passed on to the vendor


def test_numbers_are_compared_and_stored_in_one_spelling(store_url):
    store = StatusStore(store_url)
    store.ingest([], inbound=[reply("+91 98000-00001", "STOP", "STOP")])  # a sender as some gateways write it
    store.record_opt_outs(["0091 (98) 0000 0002"], via="consent_api", detail="a file")
    assert store.suppressed(["919800000001", "00919800000002", "+919800000003"]) == {
        "919800000001",
        "00919800000002",
    }
    assert set(store.consents(["+91 9800000001", "919800000002"])) == {"919800000001", "919800000002"}
    assert sorted(store.reply_opt_outs()) == ["919800000001"]

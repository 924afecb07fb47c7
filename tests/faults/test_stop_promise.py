"""Nobody who said STOP is messaged again: however the number was spelled, whenever the STOP came,
whatever the consent calls met. Each scenario runs on SQLite and PostgreSQL, through the real
receiver on loopback and a vendor stand-in on loopback, with the operators as Airflow runs them."""

from __future__ import annotations

import dataclasses
import json
import threading
import uuid
from collections import Counter
from collections.abc import Callable

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pytest_httpserver import HTTPServer
from sqlalchemy import insert
from werkzeug import Request, Response

from airflow_provider_pepipost.errors import CampaignError
from airflow_provider_pepipost.operators.consent import WhatsAppConsentOperator
from airflow_provider_pepipost.operators.whatsapp import SendWhatsAppTemplateOperator
from airflow_provider_pepipost.status import schema
from airflow_provider_pepipost.status.inbound import InboundMessage, WebhookBatch
from airflow_provider_pepipost.status.store import StatusStore
from airflow_provider_pepipost.version_compat import AirflowFailException
from tests.conftest import WEBHOOK_TOKEN
from tests.helpers import StandInTaskInstance, run_operator

NUMBERS = [f"9198{i:08d}" for i in range(300)]
TEMPLATE = {"template_name": "spring_offer", "attributes": ["Asha"]}
# Characters a number is written with: spaces of several kinds, dashes, dots, brackets, and the
# invisible marks a spreadsheet copies along.
SEPARATORS = [" ", "-", ".", "\u00a0", "\u2013", "\u200e", "\u2060", "  "]


def stop_reply(sender: str, text: str = "STOP") -> dict:
    return {"message_id": f"in-{uuid.uuid4().hex}", "from": sender, "received_at": "1700000000",
            "message_type": "TEXT", "text_type": {"text": text}, "context": {"ncmessage_id": None}}  # fmt: skip


def post_replies(receiver, replies: list[dict]) -> dict:
    answer = requests.post(
        receiver.webhook_url,
        json={"incoming_message": replies},
        headers={"X-Pepipost-Token": WEBHOOK_TOKEN},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


def spelled(number: str, draw: Callable[[list], object] | None = None) -> str:
    """``number`` written as people and gateways write it: +, 00, brackets, separators."""
    choose = draw or (lambda options: options[0])
    prefix = choose(["+", "00", "", "+ ", "00 "])
    country, rest = number[:2], number[2:]
    country = choose([country, f"({country})"])
    cut = int(choose([3, 5, 6]))
    return f"{prefix}{country}{choose(SEPARATORS)}{rest[:cut]}{choose(SEPARATORS)}{rest[cut:]}"


@st.composite
def spellings(draw, number: str) -> str:
    return spelled(number, lambda options: draw(st.sampled_from(options)))


# -- 1. one spelling everywhere ---------------------------------------------------------------


def test_a_stop_from_a_number_written_any_way_keeps_both_operators_from_messaging_it(
    receiver, store_url, pepipost_conn, sandbox
):
    pepipost_conn(sandbox.url, store_url)
    senders = [NUMBERS[0], "+91 98000000 01", "+91-9800-000002", "0091 98000 00003", "(91) 9800000004"]
    assert post_replies(receiver, [stop_reply(sender) for sender in senders])["opt_outs"] == 5
    audience = ["+91 98000 00000", "919800000001", "0091-98000-00002", "+919800000003", "91 (98000) 00004"]
    audience += NUMBERS[10:15]
    for operator, extra in ((None, {}), (SendWhatsAppTemplateOperator, TEMPLATE)):
        ids, ti = run_operator(audience, StandInTaskInstance(task_id=f"send_{len(extra)}"), operator, **extra)
        assert not isinstance(ids, Exception), ids
        assert (ti.xcom["send_summary"]["suppressed"], ti.xcom["send_summary"]["accepted"]) == (5, 5)
    assert [sandbox.state.accepted_by_recipient[n] for n in NUMBERS[:5]] == [0] * 5
    assert all(sandbox.state.accepted_by_recipient[n] == 2 for n in NUMBERS[10:15])


def test_the_ledger_and_the_vendor_see_the_canonical_number(store_url, pepipost_conn, sandbox):
    pepipost_conn(sandbox.url, store_url)
    ids, ti = run_operator(["0091 98000 00007"])
    assert not isinstance(ids, Exception), ids
    assert sandbox.state.accepted[0]["body"]["message"][0]["recipient_whatsapp"] == "919800000007"
    assert ti.xcom["messages"][0]["recipient"] == "9198******07"  # XCom is for every DAG reader: masked
    (row,) = StatusStore(store_url).export_campaign("faults", "faults-run", "send", full_numbers=True)
    assert row[3] == "919800000007"  # the store keeps it whole, canonical


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_no_generated_spelling_of_an_opted_out_number_is_ever_sent(request, backend, pepipost_conn, sandbox):
    store_url = request.getfixturevalue(f"{backend}_url")
    pepipost_conn(sandbox.url, store_url)
    store = StatusStore(store_url)
    runs = iter(range(10_000))

    def forget_the_stops() -> None:
        """Each example starts from an empty suppression list, so that each can fail on its own:
        a STOP row left by one example (in whatever spelling) must not protect the next."""
        with store.engine.begin() as conn:
            conn.execute(schema.suppressions.delete())

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(index=st.integers(0, 99), data=st.data())
    def check(index: int, data: st.DataObject) -> None:
        number = NUMBERS[100 + index]
        stop_as = data.draw(spellings(number), label="the STOP's sender")
        send_as = data.draw(spellings(number), label="the audience row")
        forget_the_stops()
        store.ingest([], inbound=[InboundMessage("text", _as_the_receiver_files(stop_as), None,
                                                 json.dumps(stop_reply(stop_as)), opt_out="STOP")])  # fmt: skip
        before = sandbox.state.accepted_by_recipient[number]
        _, ti = run_operator([send_as, NUMBERS[250]], StandInTaskInstance(run_id=f"spelling-{next(runs)}"))
        assert ti.xcom["messages"][0]["state"] == "suppressed", (stop_as, send_as)
        assert sandbox.state.accepted_by_recipient[number] == before

    check()


def _as_the_receiver_files(sender: str) -> str:
    """What the receiver's parser makes of a reply's sender."""
    from airflow_provider_pepipost.webhook.payload import parse_body

    sender_as_filed = parse_body({"incoming_message": [stop_reply(sender)]}).inbound[0].sender
    assert sender_as_filed is not None
    return sender_as_filed


def test_numbers_stored_before_the_migration_are_made_canonical(store_url):
    """A store of schema 6 held senders as written: the migration rewrites them, merging spellings."""
    store = StatusStore(store_url)
    sup, inbound, led, events = schema.suppressions, schema.inbound_messages, schema.ledger, schema.events
    with store.engine.begin() as conn:
        conn.execute(insert(sup), [
            {"recipient": "+91 98000 00001", "opted_out": True, "changed_at": 10.0, "via": "reply", "revision": 1},
            {"recipient": "919800000001", "opted_out": False, "changed_at": 5.0, "via": "consent_api", "revision": 1},
            {"recipient": "0091-98000-00002", "opted_out": True, "changed_at": 1.0, "via": "reply", "revision": 1},
        ])  # fmt: skip
        conn.execute(insert(inbound).values(inbound_key="k1", sender="+91 98000 00001", received_at=1.0, raw="{}"))
        conn.execute(insert(led).values(
            idempotency_key="i1", api_header="h1", recipient="00919800000003", dag_id="d", run_id="r", task_id="t",
            map_index=-1, row_index=0, state="accepted", sent_at=1.0, updated_at=1.0,
        ))  # fmt: skip
        conn.execute(insert(led).values(
            idempotency_key="i2", api_header="h2", recipient="919800000004-1581234567", dag_id="d", run_id="r",
            task_id="t", map_index=-1, row_index=1, state="accepted", sent_at=1.0, updated_at=1.0,
        ))  # a group id: not a number, left as it is  # fmt: skip
        conn.execute(insert(events), [
            {"event_key": f"e{i}", "message_id": f"m{i}", "status": "delivered", "raw_status": "delivered",
             "remark": "", "received_at": 1.0, "recipient": recipient, "raw": "{}"}
            for i, recipient in enumerate(["+91 98000-00005", "919800000006", "group-1581234567"])
        ])  # fmt: skip
        conn.execute(schema.schema_version.delete())
        conn.execute(insert(schema.schema_version).values(version=6, applied_at=1.0))
    _forget_schema(store_url)
    migrated = StatusStore(store_url)
    assert migrated.schema_version() == schema.SCHEMA_VERSION
    with migrated.engine.connect() as conn:
        rows = {r.recipient: (r.opted_out, r.via) for r in conn.execute(sup.select())}
        senders = list(conn.execute(inbound.select().with_only_columns(inbound.c.sender)).scalars())
        ledger_numbers = sorted(conn.execute(led.select().with_only_columns(led.c.recipient)).scalars())
        event_numbers = sorted(conn.execute(events.select().with_only_columns(events.c.recipient)).scalars())
    assert rows == {"919800000001": (True, "reply"), "919800000002": (True, "reply")}  # the latest change won
    assert senders == ["919800000001"]
    assert ledger_numbers == ["919800000003", "919800000004-1581234567"]
    assert event_numbers == ["919800000005", "919800000006", "group-1581234567"]


def _forget_schema(store_url: str) -> None:
    from airflow_provider_pepipost.status import store as store_module

    store_module._SCHEMA_READY.discard(store_url)


# -- 2. a confirmation never undoes a later STOP ----------------------------------------------


class ConsentVendor:
    """The vendor's consent API on loopback; ``during_optin`` runs while an opt-in call is held."""

    def __init__(
        self,
        during_optin: Callable[[list[str]], None] | None = None,
        refuse: set[str] = frozenset(),
        optout_outages: int = 0,
    ):
        self.during_optin, self.refuse = during_optin, refuse
        self.optout_outages = optout_outages  # opt-out calls answered 500 (the outcome unknown) first
        self.calls: list[tuple[str, list[str]]] = []
        self.lock = threading.Lock()

    def handle(self, request: Request) -> Response:
        body = request.get_json()
        numbers = [item["recipient"] for item in body["recipients"]]
        bad = [n for n in numbers if n in self.refuse or not n.isdigit()]
        with self.lock:
            self.calls.append((body["type"], numbers))
            outage = body["type"] == "optout" and self.optout_outages > 0
            self.optout_outages -= outage
        if outage:
            return Response("Internal Server Error", 500)
        if bad:
            message = "Invalid recipient. Only numeric values allowed." if not bad[0].isdigit() else "blocked."
            return Response(json.dumps({"status": "failure", "error": {"code": "8006", "message": message}}), 400)
        if body["type"] == "optin" and self.during_optin:
            self.during_optin(numbers)
        return Response(json.dumps({"status": "success", "message": "Optin successfully added."}), 200)

    def numbers(self, kind: str) -> Counter:
        return Counter(n for call_kind, numbers in self.calls if call_kind == kind for n in numbers)


def run_consent(ti: StandInTaskInstance | None = None, **kwargs):
    ti = ti or StandInTaskInstance(task_id="opt_in")
    kwargs.setdefault("source", "WEB_SIGNUP")
    try:
        return WhatsAppConsentOperator(task_id=ti.task_id, **kwargs).execute({"ti": ti})
    except Exception as err:  # the caller asserts on it
        return err


def test_a_stop_that_arrives_while_the_opt_in_is_with_the_vendor_stays_and_reaches_the_vendor(
    httpserver: HTTPServer, receiver, store_url, pepipost_conn, sandbox
):
    def stop_now(numbers: list[str]) -> None:
        if NUMBERS[3] in numbers:  # the person replies STOP while the batch is being opted in
            assert post_replies(receiver, [stop_reply("+91 98000 00003")])["opt_outs"] == 1

    vendor = ConsentVendor(stop_now)
    httpserver.expect_request("/api/v2/consent/manage/").respond_with_handler(vendor.handle)
    pepipost_conn(httpserver.url_for(""), store_url)
    result = run_consent(recipients=NUMBERS[:20], batch_size=10)
    assert not isinstance(result, Exception), result
    assert (result["confirmed"], result["opted_out_during_call"]) == (19, 1)
    store = StatusStore(store_url)
    assert store.suppressed(NUMBERS[:20]) == {NUMBERS[3]}
    assert vendor.numbers("optout") == Counter({NUMBERS[3]: 1})  # the STOP reached the vendor after the opt-in
    assert store.reply_opt_outs() == []  # ...and is marked passed on
    pepipost_conn(sandbox.url, store_url)
    _, ti = run_operator(NUMBERS[:20])
    assert sandbox.state.accepted_by_recipient[NUMBERS[3]] == 0 and ti.xcom["send_summary"]["suppressed"] == 1


def test_a_stop_that_raced_an_opt_in_reaches_the_vendor_on_the_retry_when_the_first_pass_failed(
    httpserver: HTTPServer, receiver, store_url, pepipost_conn
):
    def stop_now(numbers: list[str]) -> None:
        if NUMBERS[3] in numbers:
            assert post_replies(receiver, [stop_reply(NUMBERS[3])])["opt_outs"] == 1

    vendor = ConsentVendor(stop_now, optout_outages=1)  # passing the raced STOP on meets a 500 once
    httpserver.expect_request("/api/v2/consent/manage/").respond_with_handler(vendor.handle)
    pepipost_conn(httpserver.url_for(""), store_url)
    first = run_consent(recipients=NUMBERS[:10], batch_size=10)
    assert isinstance(first, CampaignError) and "the next try passes them on" in str(first)
    assert NUMBERS[3] not in str(first)
    store = StatusStore(store_url)
    assert store.reply_opt_outs() == [NUMBERS[3]]
    second = run_consent(recipients=NUMBERS[:10], batch_size=10)  # the same task instance, tried again
    assert not isinstance(second, Exception), second
    assert vendor.numbers("optin") == Counter({n: 1 for n in NUMBERS[:10]})  # the batch is not called again
    assert (second["batches_reused"], second["confirmed"], second["opted_out_during_call"]) == (1, 9, 1)
    assert second["reply_opt_outs_synced"] == 1
    assert vendor.calls[-1] == ("optout", [NUMBERS[3]])  # the STOP reached the vendor after the opt-in
    assert store.reply_opt_outs() == [] and store.suppressed(NUMBERS[:10]) == {NUMBERS[3]}


def test_a_stop_from_a_number_opted_in_earlier_wins_over_a_new_opt_in_that_is_with_the_vendor(
    httpserver: HTTPServer, receiver, store_url, pepipost_conn, sandbox
):
    """The everyday case: the number has a row (opted in by an earlier campaign) when the new
    batch is read, and says STOP while that batch is with the vendor."""
    pepipost_conn(sandbox.url, store_url)
    earlier = run_consent(StandInTaskInstance(run_id="sign-up-1", task_id="opt_in"), recipients=NUMBERS[:10])
    assert not isinstance(earlier, Exception), earlier
    store = StatusStore(store_url)
    assert store.consents([NUMBERS[3]])[NUMBERS[3]].opted_out is False  # a row, opted in

    def stop_now(numbers: list[str]) -> None:
        if NUMBERS[3] in numbers:
            assert post_replies(receiver, [stop_reply("+91 98000 00003")])["opt_outs"] == 1

    vendor = ConsentVendor(stop_now)
    httpserver.expect_request("/api/v2/consent/manage/").respond_with_handler(vendor.handle)
    pepipost_conn(httpserver.url_for(""), store_url)
    result = run_consent(StandInTaskInstance(run_id="sign-up-2", task_id="opt_in"), recipients=NUMBERS[:10])
    assert not isinstance(result, Exception), result
    assert (result["confirmed"], result["opted_out_during_call"], result["skipped_opted_out"]) == (9, 1, 0)
    assert store.suppressed(NUMBERS[:10]) == {NUMBERS[3]}  # the STOP won
    assert vendor.numbers("optout") == Counter({NUMBERS[3]: 1}) and store.reply_opt_outs() == []
    pepipost_conn(sandbox.url, store_url)
    _, ti = run_operator(NUMBERS[:10])
    assert sandbox.state.accepted_by_recipient[NUMBERS[3]] == 0 and ti.xcom["send_summary"]["suppressed"] == 1


def test_lift_opt_outs_lifts_only_the_opt_outs_older_than_the_batch(httpserver: HTTPServer, store_url, pepipost_conn):
    store = StatusStore(store_url)
    store.record_opt_outs([NUMBERS[1]], via="reply", detail="an old STOP")
    vendor = ConsentVendor(lambda numbers: store.record_opt_outs([NUMBERS[2]], via="reply", detail="a new STOP"))
    httpserver.expect_request("/api/v2/consent/manage/").respond_with_handler(vendor.handle)
    pepipost_conn(httpserver.url_for(""), store_url)
    result = run_consent(recipients=NUMBERS[:5], lift_opt_outs=True)
    assert not isinstance(result, Exception), result
    assert store.suppressed(NUMBERS[:5]) == {NUMBERS[2]}  # the old one lifted, the new one kept
    assert result["opted_out_during_call"] == 1 and vendor.numbers("optout") == Counter({NUMBERS[2]: 1})


# -- 3. a STOP takes effect within the running campaign ---------------------------------------


class SendVendor:
    """The vendor's send API on loopback, counting sends by number; ``on_send(n, number)`` runs
    inside the n-th request, before its answer."""

    def __init__(self, on_send: Callable[[int, str], None]):
        self.on_send = on_send
        self.sent: Counter = Counter()
        self.lock = threading.Lock()

    def handle(self, request: Request) -> Response:
        number = request.get_json()["message"][0]["recipient_whatsapp"]
        with self.lock:
            n = sum(self.sent.values())
            self.sent[number] += 1
        self.on_send(n, number)
        answer = {"status": "success", "message": "Request received successfully.", "data": {"id": str(uuid.uuid4())}}
        return Response(json.dumps(answer), 200, content_type="application/json")


@pytest.mark.parametrize(
    ("settings_", "stopped_row"),
    [
        # One worker: rows 1 and 2 were claimed while row 0 was sent (2 x max_workers ahead, the
        # README's bound); row 3, the first one claimed after the STOP, is the first it stops.
        ({"max_workers": 1}, 3),
        # Paced at 1 a second: row 3 was claimed long before its turn, and is checked again then.
        ({"max_workers": 4, "max_rate": 1}, 3),
    ],
    ids=["claimed-after-the-stop", "paced"],
)
def test_a_stop_stored_mid_campaign_stops_that_campaigns_later_message(
    httpserver: HTTPServer, receiver, store_url, pepipost_conn, settings_, stopped_row
):
    def stop_during_first_send(n: int, _number: str) -> None:
        if n == 0:
            assert post_replies(receiver, [stop_reply(NUMBERS[stopped_row])])["opt_outs"] == 1

    vendor = SendVendor(stop_during_first_send)
    httpserver.expect_request("/api/v2/message/").respond_with_handler(vendor.handle)
    pepipost_conn(httpserver.url_for(""), store_url)
    ids, ti = run_operator(NUMBERS[:8], **settings_)
    assert not isinstance(ids, Exception), ids
    assert vendor.sent[NUMBERS[stopped_row]] == 0
    assert ti.xcom["messages"][stopped_row]["state"] == "suppressed"
    assert ti.xcom["send_summary"]["accepted"] == 7


# -- 4. reply opt-outs always reach the vendor ------------------------------------------------


def test_one_bad_number_among_the_reply_opt_outs_costs_nobody_else_and_keeps_the_task_red(
    httpserver: HTTPServer, store_url, pepipost_conn
):
    store = StatusStore(store_url)
    store.record_opt_outs(NUMBERS[:20], via="reply", detail="replied 'STOP'")
    with store.engine.begin() as conn:  # a sender stored before numbers were checked: no number at all
        conn.execute(insert(schema.suppressions).values(
            recipient="98000", opted_out=True, changed_at=1.0, via="reply", revision=1
        ))  # fmt: skip
    vendor = ConsentVendor(refuse={NUMBERS[7]})
    httpserver.expect_request("/api/v2/consent/manage/").respond_with_handler(vendor.handle)
    pepipost_conn(httpserver.url_for(""), store_url)
    error = run_consent(recipients=None, sync_reply_opt_outs=True, batch_size=10)
    assert isinstance(error, AirflowFailException)
    assert "2 opt-out(s) could not be passed on" in str(error) and NUMBERS[7] not in str(error)
    assert "9198******07 (8006: blocked.)" in str(error) and "(not a number of 10 to 15 digits)" in str(error)
    # Isolating the refused number took 4 refused calls: rows 0-9, 5-9, 7-9, then 7 alone.
    assert "1 refused (in 4 refused call(s))" in str(error) and "'reply_opt_outs_refused_calls': 4" in str(error)
    assert set(vendor.numbers("optout")) == set(NUMBERS[:20])  # 19 confirmed, the refused one isolated
    assert "98000" not in vendor.numbers("optout")  # checked before any call
    assert sorted(store.reply_opt_outs()) == sorted(["98000", NUMBERS[7]])  # tried again next run
    again = run_consent(StandInTaskInstance(run_id="r2", task_id="opt_in"), recipients=None, sync_reply_opt_outs=True)
    assert isinstance(again, AirflowFailException)  # not green while they stay unsynced


def test_the_failure_says_how_many_opt_outs_stayed_unsynced_beyond_the_five_it_names(
    httpserver: HTTPServer, store_url, pepipost_conn
):
    store = StatusStore(store_url)
    store.record_opt_outs(NUMBERS[:12], via="reply", detail="replied 'STOP'")
    vendor = ConsentVendor(refuse=set(NUMBERS[:7]))
    httpserver.expect_request("/api/v2/consent/manage/").respond_with_handler(vendor.handle)
    pepipost_conn(httpserver.url_for(""), store_url)
    error = run_consent(recipients=None, sync_reply_opt_outs=True, batch_size=10)
    assert isinstance(error, AirflowFailException)
    message = str(error)
    assert "7 opt-out(s) could not be passed on to the vendor and stay unsynced: 7 refused (in 14 refused call(s))" in (
        message
    )
    assert "'reply_opt_outs_refused_calls': 14" in message and "The other 5 were passed on" in message
    assert sum(f"9198******{i:02d} (8006: blocked.)" in message for i in range(7)) == 5  # the first five, masked
    assert not any(number in message for number in NUMBERS[:12])
    assert sorted(store.reply_opt_outs()) == NUMBERS[:7]


# -- 5. a consent batch is called once, whatever happens between tries -------------------------


def test_a_stop_between_two_tries_does_not_recut_the_batches(store_url, pepipost_conn):
    from airflow_provider_pepipost.sandbox import SandboxServer, Scenario

    with SandboxServer(Scenario(outage_after=3, outage_requests=6)) as vendor:
        pepipost_conn(vendor.url, store_url, max_retries=1, backoff_max=0.01)
        first = run_consent(recipients=NUMBERS[:200], batch_size=20, max_workers=1)
        assert not isinstance(first, dict)
        StatusStore(store_url).record_opt_outs([NUMBERS[5]], via="reply", detail="replied 'STOP'")  # batch 0
        second = run_consent(StandInTaskInstance(task_id="opt_in"), recipients=NUMBERS[:200], batch_size=20)
        assert not isinstance(second, Exception), second
        opted_in = Counter(
            n for call in vendor.state.consent_calls if call["type"] == "optin" for n in call["recipients"]
        )
        assert max(opted_in.values()) == 1 and len(opted_in) == 200  # nobody opted in twice
        assert second["confirmed"] + second["skipped_opted_out"] == 200


# -- 6. stop words with invisible characters ---------------------------------------------------

INVISIBLE = ["\u200b", "\u2060", "\u00ad", "\u200c", "\u200d", "\ufeff", "\u200e"]


def test_stop_words_with_invisible_characters_opt_their_senders_out(receiver, store_url, pepipost_conn, sandbox):
    texts = [
        "S\u200bTOP", "ST\u2060OP", "S\u00adTOP", "ST\u200cOP", "\ufeffstop", "Stop\u200d!", "UN\u00adSUB\u00adSCRIBE",
        "stop\u200b all", "S T O P", "\u200eSTOP\u200f", "\uff33\uff34\uff2f\uff30", "sTop.",
    ]  # fmt: skip
    answer = post_replies(receiver, [stop_reply(NUMBERS[i], text) for i, text in enumerate(texts)])
    assert answer["opt_outs"] == len(texts)
    pepipost_conn(sandbox.url, store_url)
    _, ti = run_operator(NUMBERS[: len(texts)])
    assert ti.xcom["send_summary"]["suppressed"] == len(texts)
    assert sum(sandbox.state.accepted_by_recipient[n] for n in NUMBERS[: len(texts)]) == 0


@settings(max_examples=300, deadline=None)
@given(
    word=st.sampled_from(["STOP", "UNSUBSCRIBE", "STOP ALL"]),
    data=st.data(),
)
def test_every_spelling_of_a_stop_word_is_a_stop(word: str, data: st.DataObject) -> None:
    from airflow_provider_pepipost.webhook.payload import parse_body

    chars = []
    for char in word:
        chars.append(data.draw(st.sampled_from([char.lower(), char.upper()])))
        chars.append(data.draw(st.text(st.sampled_from([*INVISIBLE, " "]), max_size=3)))
    edge = st.text(st.sampled_from([" ", ".", "!", "\u200b", "\n"]), max_size=3)
    text = data.draw(edge) + "".join(chars) + data.draw(edge)
    batch = parse_body({"incoming_message": [stop_reply("+91 98000 00001", text)]})
    assert batch.inbound[0].opt_out == word.replace(" ", ""), repr(text)
    assert batch.inbound[0].sender == "919800000001"


# -- 7. per-body answers under group commit ---------------------------------------------------


def test_each_body_in_a_group_commit_counts_its_own_opt_outs(store_url):
    from airflow_provider_pepipost.webhook.payload import parse_body

    store = StatusStore(store_url)
    bodies = [[stop_reply(n) for n in NUMBERS[:3]], [stop_reply(n) for n in NUMBERS[3:8]] + [stop_reply(NUMBERS[0])]]
    batches = []
    for replies in bodies:
        batches.append(parse_body({"incoming_message": replies}))
    results = store.ingest_many(batches)
    assert [r.opt_outs for r in results] == [3, 6]  # the second body's STOP from NUMBERS[0] is its own


def test_a_body_stored_apart_after_a_failed_group_commit_still_counts_its_opt_outs(store_url):
    from airflow_provider_pepipost.webhook.batching import store_apart
    from airflow_provider_pepipost.webhook.payload import parse_body

    parsed = parse_body({"incoming_message": [stop_reply(n) for n in NUMBERS[:4]]})
    # One reply the database refuses (a NUL cannot be stored on PostgreSQL): it is halved out.
    poison = dataclasses.replace(
        parsed.inbound[0], raw=parsed.inbound[0].raw + "\x00" * store_url.startswith("postgres")
    )
    result = store_apart(StatusStore(store_url), WebhookBatch(inbound=[poison, *parsed.inbound[1:]]))
    assert result.opt_outs == (3 if store_url.startswith("postgres") else 4)

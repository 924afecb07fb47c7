"""WhatsAppConsentOperator and the suppression list through the campaign engine, on loopback."""

from __future__ import annotations

import pytest
from pytest_httpserver import HTTPServer
from sqlalchemy import select
from werkzeug import Request, Response

from airflow_provider_pepipost.errors import CampaignError
from airflow_provider_pepipost.operators.consent import WhatsAppConsentOperator
from airflow_provider_pepipost.sandbox import SandboxServer, Scenario
from airflow_provider_pepipost.status import schema
from airflow_provider_pepipost.status.store import StatusStore
from airflow_provider_pepipost.version_compat import AirflowFailException
from tests.helpers import StandInTaskInstance, run_operator

NUMBERS = [f"9198{i:08d}" for i in range(250)]


def run_consent(ti: StandInTaskInstance | None = None, **kwargs) -> tuple[object, StandInTaskInstance]:
    ti = ti or StandInTaskInstance(task_id="opt_in")
    kwargs.setdefault("source", "WEB_SIGNUP")
    operator = WhatsAppConsentOperator(task_id=ti.task_id, **kwargs)
    try:
        return operator.execute({"ti": ti}), ti
    except Exception as err:  # the caller asserts on it
        return err, ti


def test_a_retry_after_a_failure_in_the_middle_calls_each_confirmed_batch_once(sqlite_url, pepipost_conn):
    # Requests 4 to 9 meet an outage (503 without Retry-After: the answer cannot tell).
    with SandboxServer(Scenario(outage_after=3, outage_requests=6)) as vendor:
        pepipost_conn(vendor.url, sqlite_url, max_retries=1, backoff_max=0.01)
        first, _ = run_consent(recipients=NUMBERS, batch_size=25, max_workers=2)
        assert isinstance(first, CampaignError) and "not confirmed" in str(first)
        confirmed_first = len(vendor.state.consent_calls)
        assert 0 < confirmed_first < 10
        second, _ = run_consent(StandInTaskInstance(task_id="opt_in"), recipients=NUMBERS, batch_size=25)
        assert not isinstance(second, Exception), second
        assert second["confirmed"] == 250 and second["batches_reused"] == confirmed_first
        calls = [tuple(call["recipients"]) for call in vendor.state.consent_calls]
        assert len(calls) == len(set(calls)) == 10  # every batch confirmed, none called twice
        assert sorted(n for call in calls for n in call) == NUMBERS
        assert set(vendor.state.opted_in) == set(NUMBERS)


def refuse_one_number(request: Request) -> Response:
    body = request.get_json()
    if any(r["recipient"] == NUMBERS[7] for r in body["recipients"]):
        return Response('{"status":"failure","error":{"code":"8006","message":"recipient is blocked."}}', 400)
    return Response('{"status":"success","message":"Optin successfully added."}', 200)


def test_a_refused_batch_is_reported_with_all_its_rows_and_fails_over_the_ratio(httpserver: HTTPServer, sqlite_url,
                                                                                pepipost_conn):  # fmt: skip
    httpserver.expect_request("/api/v2/consent/manage/").respond_with_handler(refuse_one_number)
    pepipost_conn(httpserver.url_for(""), sqlite_url)
    error, _ = run_consent(recipients=NUMBERS[:50], batch_size=10)
    assert isinstance(error, AirflowFailException) and "refused 10 of 50 rows" in str(error)
    assert NUMBERS[7] not in str(error)  # masked
    result, _ = run_consent(StandInTaskInstance(run_id="r2", task_id="opt_in"), recipients=NUMBERS[:50],
                            batch_size=10, max_rejected_ratio=0.2)  # fmt: skip
    assert (result["confirmed"], result["refused"]) == (40, 10)
    assert [r["row"] for r in result["failed_rows"]] == list(range(10))
    assert {r["error_message"] for r in result["failed_rows"]} == {"recipient is blocked."}


def test_bad_rows_fail_before_any_call_naming_row_and_field(sandbox, sqlite_url, pepipost_conn):
    pepipost_conn(sandbox.url, sqlite_url)
    rows = [{"recipient": NUMBERS[0]}, {"recipient": NUMBERS[1], "ip": "999.1.1.1"}, {"recipient": "12"}]
    error, _ = run_consent(recipients=rows)
    assert isinstance(error, AirflowFailException)
    assert "row 1, field 'ip'" in str(error) and "row 2, field 'recipient'" in str(error)
    assert "no consent was recorded" in str(error) and sandbox.state.requests == 0
    error, _ = run_consent(recipients=NUMBERS[:1], source="S" * 26)
    assert isinstance(error, AirflowFailException) and "at most 25" in str(error)


def test_opted_out_numbers_are_skipped_by_the_send_operators_and_an_opt_in_lifts_it(sqlite_url, pepipost_conn):
    with SandboxServer(Scenario()) as vendor:
        pepipost_conn(vendor.url, sqlite_url)
        out, _ = run_consent(recipients=NUMBERS[:3], kind="optout")
        assert out["confirmed"] == 3 and vendor.state.opted_out == set(NUMBERS[:3])
        ids, ti = run_operator(NUMBERS[:10])
        assert not isinstance(ids, Exception), ids
        summary = ti.xcom["send_summary"]
        assert (summary["accepted"], summary["suppressed"]) == (7, 3)
        assert [m["state"] for m in ti.xcom["messages"][:4]] == ["suppressed"] * 3 + ["accepted"]
        assert sum(vendor.state.accepted_by_recipient[n] for n in NUMBERS[:3]) == 0

        _, ti = run_operator(NUMBERS[:10], StandInTaskInstance(run_id="forced"), respect_opt_outs=False)
        assert ti.xcom["send_summary"]["suppressed"] == 0

        # The same sign-ups processed again do not undo the opt-out...
        again, _ = run_consent(StandInTaskInstance(run_id="again", task_id="opt_in"), recipients=NUMBERS[:5])
        assert (again["skipped_opted_out"], again["confirmed"]) == (3, 2)
        assert StatusStore(sqlite_url).suppressed(NUMBERS[:3]) == set(NUMBERS[:3])
        # ...a consent given anew does.
        back, _ = run_consent(StandInTaskInstance(run_id="back", task_id="opt_in"), recipients=NUMBERS[:3],
                              lift_opt_outs=True)  # fmt: skip
        assert back["confirmed"] == 3 and StatusStore(sqlite_url).suppressed(NUMBERS[:3]) == set()
        assert not vendor.state.opted_out


def test_an_audience_that_all_opted_out_fails_saying_so(sqlite_url, pepipost_conn, sandbox):
    pepipost_conn(sandbox.url, sqlite_url)
    StatusStore(sqlite_url).record_opt_outs(NUMBERS[:5], via="reply", detail="replied 'STOP'")
    error, ti = run_operator(NUMBERS[:5])
    assert isinstance(error, AirflowFailException) and "opted out" in str(error)
    assert ti.xcom["send_summary"]["suppressed"] == 5 and sandbox.state.requests == 0


def test_reply_opt_outs_are_passed_on_to_the_vendor_once(sqlite_url, pepipost_conn):
    store = StatusStore(sqlite_url)
    store.record_opt_outs(NUMBERS[:30], via="reply", detail="replied 'STOP'")
    with SandboxServer(Scenario()) as vendor:
        pepipost_conn(vendor.url, sqlite_url)
        result, _ = run_consent(recipients=None, sync_reply_opt_outs=True, batch_size=20)
        assert not isinstance(result, Exception), result
        assert result["reply_opt_outs_synced"] == 30 and vendor.state.opted_out == set(NUMBERS[:30])
        calls = vendor.state.consent_calls
        assert [c["type"] for c in calls] == ["optout", "optout"]
        assert sorted(len(c["recipients"]) for c in calls) == [10, 20]  # batch_size 20, sent concurrently
        again, _ = run_consent(StandInTaskInstance(run_id="r2", task_id="opt_in"), recipients=None,
                               sync_reply_opt_outs=True)  # fmt: skip
        assert again["reply_opt_outs_synced"] == 0 and len(vendor.state.consent_calls) == 2
    assert store.reply_opt_outs() == []
    with store.engine.connect() as conn:  # still on the list as replies, now marked passed on
        rows = conn.execute(select(schema.suppressions.c.via, schema.suppressions.c.synced_at)).all()
    assert len(rows) == 30 and all(via == "reply" and synced is not None for via, synced in rows)


@pytest.mark.parametrize(("name", "value"), [("kind", "subscribe"), ("batch_size", 0), ("max_rejected_ratio", 2)])
def test_settings_that_cannot_work_fail_naming_them(sandbox, sqlite_url, pepipost_conn, name, value):
    pepipost_conn(sandbox.url, sqlite_url)
    error, _ = run_consent(recipients=NUMBERS[:2], **{name: value})
    assert isinstance(error, AirflowFailException) and name in str(error)


def test_an_unexpected_error_while_passing_opt_outs_on_fails_the_task_for_a_retry(sqlite_url, pepipost_conn,
                                                                                  monkeypatch):  # fmt: skip
    from airflow_provider_pepipost.hooks.pepipost import PepipostHook

    store = StatusStore(sqlite_url)
    store.record_opt_outs(NUMBERS[:30], via="reply", detail="replied 'STOP'")
    real = PepipostHook.manage_consent

    def crash_on_one_batch(self, kind, recipients):
        if any(row.recipient == NUMBERS[25] for row in recipients):
            raise RuntimeError(f"a bug, near {NUMBERS[25]}")
        return real(self, kind, recipients)

    monkeypatch.setattr(PepipostHook, "manage_consent", crash_on_one_batch)
    with SandboxServer(Scenario()) as vendor:
        pepipost_conn(vendor.url, sqlite_url)
        error, _ = run_consent(recipients=None, sync_reply_opt_outs=True, batch_size=10)
    assert isinstance(error, CampaignError), error  # retryable: the next try passes them on
    assert not isinstance(error, AirflowFailException)
    message = str(error)
    assert "RuntimeError" in message and "10 opt-out(s) could not be passed on" in message
    assert "'reply_opt_outs_synced': 20" in message and "'reply_opt_outs_not_confirmed': 10" in message
    assert NUMBERS[25] not in message and "9198******25" in message
    assert sorted(store.reply_opt_outs()) == NUMBERS[20:30]  # the 20 confirmed are marked passed on
    assert vendor.state.opted_out == set(NUMBERS[:20])


@pytest.mark.parametrize("source", ["S" * 27, "", "   ", "WEB\x00"])
def test_a_reply_opt_out_source_the_vendor_cannot_take_fails_before_any_call(sandbox, sqlite_url, pepipost_conn,
                                                                             source):  # fmt: skip
    StatusStore(sqlite_url).record_opt_outs(NUMBERS[:40], via="reply", detail="replied 'STOP'")
    pepipost_conn(sandbox.url, sqlite_url)
    error, _ = run_consent(recipients=None, sync_reply_opt_outs=True, reply_opt_out_source=source)
    assert isinstance(error, AirflowFailException) and "reply_opt_out_source" in str(error)
    assert sandbox.state.requests == 0
    assert len(StatusStore(sqlite_url).reply_opt_outs()) == 40


def test_a_reply_opt_out_source_of_25_characters_is_taken(sandbox, sqlite_url, pepipost_conn):
    StatusStore(sqlite_url).record_opt_outs(NUMBERS[:3], via="reply", detail="replied 'STOP'")
    pepipost_conn(sandbox.url, sqlite_url)
    result, _ = run_consent(recipients=None, sync_reply_opt_outs=True, reply_opt_out_source=" " + "S" * 25)
    assert not isinstance(result, Exception), result
    # Taken as the rows' sources are, without the space around it (the vendor refuses 26 characters).
    assert result["reply_opt_outs_synced"] == 3 and result["reply_opt_outs_refused_calls"] == 0

"""SendWhatsAppTemplateOperator through the shared engine, against the sandbox's approved templates."""

from __future__ import annotations

import re
from datetime import datetime

import pytest

from airflow_provider_pepipost.operators.whatsapp import SendWhatsAppTemplateOperator
from airflow_provider_pepipost.operators.xcom import parse_message_targets
from airflow_provider_pepipost.sandbox import SandboxServer, Scenario
from airflow_provider_pepipost.status.store import StatusStore
from airflow_provider_pepipost.version_compat import AirflowFailException
from tests.helpers import StandInTaskInstance, run_operator

COUNT = 300
ROWS = [{"recipient_whatsapp": f"9198{i:08d}", "name": f"Customer {i}", "invoice": f"INV-{i}"} for i in range(COUNT)]
INVOICE = {
    "template_name": "invoice_ready",
    "attributes": ["{name}", "{invoice}"],
    "media_url": "https://cdn.example.com/invoice.pdf",
    "media_type": "document",
}


@pytest.fixture
def vendor(sqlite_url, pepipost_conn):
    with SandboxServer(Scenario(closed_window_ratio=1.0, rate_5xx=0.1, rate_drop=0.02)) as server:
        pepipost_conn(server.url, sqlite_url, max_retries=8, backoff_max=0.02)
        yield server


def test_templates_reach_a_cold_audience_once_across_a_retry(vendor, sqlite_url):
    first, ti = run_operator(ROWS[:150], operator_class=SendWhatsAppTemplateOperator, max_workers=8, **INVOICE)
    assert not isinstance(first, Exception), first
    ids, ti = run_operator(ROWS, StandInTaskInstance(), operator_class=SendWhatsAppTemplateOperator, **INVOICE)
    assert not isinstance(ids, Exception), ids  # the task's retry, with the whole audience
    summary = ti.xcom["send_summary"]
    unknown = summary["unknown"]  # dropped connections: never resent
    assert summary["accepted"] + unknown == COUNT and summary["reused_from_earlier_try"] > 0
    assert vendor.state.accepted_by_type == {"template": vendor.state.accepted_count}
    assert max(vendor.state.accepted_by_header.values()) == 1  # nobody got the template twice
    bodies = [entry["body"]["message"][0] for entry in vendor.state.accepted]
    assert {b["type_template"][0]["attributes"][0] for b in bodies} <= {row["name"] for row in ROWS}
    # The sensor reads template messages like media ones.
    assert StatusStore(sqlite_url).summarize(parse_message_targets(ids)).total == COUNT


def test_an_unapproved_template_is_a_rejection_that_fails_the_task_without_retries(vendor):
    error, ti = run_operator(
        ROWS[:20], operator_class=SendWhatsAppTemplateOperator, **{**INVOICE, "template_name": "not_approved"}
    )
    assert isinstance(error, AirflowFailException)
    codes = ti.xcom["send_summary"]["error_codes"]
    assert set(codes) == {"8006"} and codes["8006"] <= 16  # sending stopped once the first refusals came back
    assert vendor.state.accepted_count == 0


def test_rows_are_checked_against_the_template_before_the_first_send(vendor):
    rows = [*ROWS[:5], {"recipient_whatsapp": "919800000001", "name": "No invoice"}]
    error, _ = run_operator(rows, operator_class=SendWhatsAppTemplateOperator, **INVOICE)
    assert isinstance(error, AirflowFailException) and "row 5, field 'attributes[1]'" in str(error)
    assert vendor.state.requests == 0


def test_session_first_then_the_template_where_the_window_is_closed_once_across_a_retry(sqlite_url, pepipost_conn):
    """8007 rows reach the phone as templates, once, with a task retry in the middle."""
    scenario = Scenario(closed_window_ratio=0.4, outage_after=120, outage_requests=12)
    with SandboxServer(scenario) as vendor:
        pepipost_conn(vendor.url, sqlite_url, max_retries=1, backoff_max=0.01)
        rows = ROWS[:200]
        options = {"attachment_id": "media-1", "caption": "Hi {name}", "fallback_template": INVOICE}
        first, ti = run_operator(rows, max_workers=4, **options)
        assert isinstance(first, Exception)  # the outage stopped the first try midway
        assert ti.xcom["send_summary"]["fallback"] > 0 and ti.xcom["send_summary"]["not_sent"] > 0
        pepipost_conn(vendor.url, sqlite_url, max_retries=8, backoff_max=0.01)
        ids, ti = run_operator(rows, StandInTaskInstance(), max_workers=4, **options)
        assert not isinstance(ids, Exception), ids

    states = [row["state"] for row in ti.xcom["messages"]]
    closed = [row for row in rows if scenario.recipient_error(row["recipient_whatsapp"]) == "8007"]
    assert states.count("fallback") == len(closed) > 40
    assert states.count("accepted") == len(rows) - len(closed)
    assert ti.xcom["send_summary"]["rejected"] == 0  # a row served by its template is not a rejection
    assert vendor.state.accepted_by_type == {"media": len(rows) - len(closed), "template": len(closed)}
    assert max(vendor.state.accepted_by_header.values()) == 1  # nobody got either message twice
    assert len(ids) == len(rows)  # every row's id, in input order
    by_id = {entry["message_id"]: entry["body"]["message"][0] for entry in vendor.state.accepted}
    for row, message_id in zip(rows, ids, strict=True):
        assert by_id[message_id]["recipient_whatsapp"] == row["recipient_whatsapp"]


def test_a_bad_fallback_template_is_caught_before_the_first_send(vendor):
    fallback = {**INVOICE, "attributes": ["{name}", "{missing}"]}
    error, _ = run_operator(ROWS[:3], attachment_id="media-1", fallback_template=fallback)
    assert isinstance(error, AirflowFailException)
    assert "field 'fallback_template.attributes[1]'" in str(error) and vendor.state.requests == 0
    error, _ = run_operator(ROWS[:3], attachment_id="media-1", fallback_template={"template": "x"})
    assert isinstance(error, AirflowFailException) and "unknown keys ['template']" in str(error)


def test_a_template_campaign_takes_no_fallback_template(vendor):
    """fallback_template is for session kinds, which the 24-hour window can close; a template
    reaches a closed window itself, so asking for one is a mistake said before the first send."""
    error, _ = run_operator(
        ROWS[:3], None, SendWhatsAppTemplateOperator, **INVOICE, fallback_template={"template_name": "other"}
    )
    assert isinstance(error, AirflowFailException) and "fallback_template is for session messages" in str(error)
    assert vendor.state.requests == 0


def test_the_progress_line_counts_every_state_and_the_last_retries_come_before_it(
    sqlite_url, pepipost_conn, capfd, caplog
):
    rows = [*(f"9198{i:08d}" for i in range(60)), "919800000001"]  # the last row repeats the second
    scenario = Scenario(closed_window_ratio=0.5, reject_ratio={"8003": 0.1}, rate_429=0.2, retry_after=0.01)
    with SandboxServer(scenario) as server:
        pepipost_conn(server.url, sqlite_url, max_retries=8, backoff_max=0.02)
        StatusStore(sqlite_url).record_opt_outs(rows[:3], via="reply", detail="replied 'STOP'")
        fallback = {"template_name": "spring_offer", "attributes": ["Asha"]}
        with caplog.at_level("WARNING", logger="airflow_provider_pepipost.hooks.pepipost"):
            _, ti = run_operator(rows, max_rejected_ratio=1.0, fallback_template=fallback)
    summary = ti.xcom["send_summary"]
    assert summary["fallback"] > 0 and summary["rejected"] > 0 and summary["suppressed"] == 3
    assert summary["duplicate"] == 1
    # The operator's lines (the task log, on stdout) and the hook's retry lines (stdlib logging).
    progress_lines = [line for line in capfd.readouterr().out.splitlines() if "] Processed " in line]
    last = progress_lines[-1]
    progress = re.search(r"^(\S+Z) .*Processed (\d+) of (\d+) rows \(100%\), [\d.]+ rows/s: (.*?) \[", last)
    assert progress and progress[2] == progress[3] == str(len(rows)), last
    counts = {label: int(n) for label, n in (part.rsplit(" ", 1) for part in progress[4].split(", "))}
    assert sum(counts.values()) == len(rows), last
    assert (counts["fallback template"], counts["rejected"], counts["opted out"]) == (
        summary["fallback"], summary["rejected"], 3,
    )  # fmt: skip
    retries = [r for r in caplog.records if r.getMessage().startswith("Retr")]
    assert retries and retries[-1].getMessage().startswith("Retried")  # the 429s were retried, and said so...
    printed_at = datetime.fromisoformat(progress[1].replace("Z", "+00:00")).timestamp()
    assert all(r.created <= printed_at for r in retries)  # ...before the last progress line

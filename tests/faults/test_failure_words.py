"""Failures say why, in a user's words: the vendor's reasons counted, what a code means and what to
do, one error for a file without a number column, the file's own line numbers, a missing file and
an unreachable store named. Through the operators, against the sandbox on loopback."""

from __future__ import annotations

import json
import socket
import time

import pytest
from pytest_httpserver import HTTPServer

from airflow_provider_pepipost.errors import StatusStoreUnavailable
from airflow_provider_pepipost.operators.whatsapp import SendWhatsAppTemplateOperator
from airflow_provider_pepipost.sandbox import SandboxServer, Scenario
from airflow_provider_pepipost.version_compat import AirflowFailException
from tests.helpers import run_operator

NUMBERS = [f"9198{i:08d}" for i in range(60)]


def test_a_refusal_says_the_vendors_reason_and_the_ratio_in_rows(sandbox, sqlite_url, pepipost_conn):
    pepipost_conn(sandbox.url, sqlite_url)
    error, _ = run_operator(
        NUMBERS[:2], operator_class=SendWhatsAppTemplateOperator, template_name="spring_offer", attributes=["a", "b"]
    )
    assert isinstance(error, AirflowFailException)
    text = str(error)
    assert "2 of 2 rows were rejected by the vendor" in text
    assert "max_rejected_ratio=0 allows (0 row(s): 0 % of 2)" in text
    assert "8006 'Template spring_offer takes 1 attributes, not 2.' (2 rows)" in text
    assert ".." not in text.replace("...", "")


def test_a_closed_window_says_what_8007_means_and_names_fallback_template(sqlite_url, pepipost_conn):
    with SandboxServer(Scenario(closed_window_ratio=1.0)) as vendor:
        pepipost_conn(vendor.url, sqlite_url)
        error, _ = run_operator(NUMBERS[:40], max_rejected_ratio=0.02)
    text = str(error)
    assert "(0 row(s): 2 % of 40)" in text
    assert "24 hours" in text and "fallback_template" in text and "SendWhatsAppTemplateOperator" in text


def test_numbers_in_the_vendors_text_are_masked(httpserver: HTTPServer, sqlite_url, pepipost_conn):
    failure = {"status": "failure", "error": {"code": "8003", "message": f"{NUMBERS[3]} is not on WhatsApp"}}
    httpserver.expect_request("/api/v2/message/").respond_with_json(failure, status=400)
    pepipost_conn(httpserver.url_for(""), sqlite_url)
    error, _ = run_operator(NUMBERS[3:4])
    assert isinstance(error, AirflowFailException)
    assert NUMBERS[3] not in str(error) and "9198******03 is not on WhatsApp" in str(error)
    assert "not on WhatsApp." in str(error)  # the hint for 8003


def test_a_csv_without_a_number_column_says_so_once(tmp_path, sandbox, sqlite_url, pepipost_conn):
    pepipost_conn(sandbox.url, sqlite_url)
    audience = tmp_path / "audience.csv"
    audience.write_text("Recipient_WhatsApp ,name\n" + "".join(f"{n},Asha\n" for n in NUMBERS[:500]))
    error, _ = run_operator(str(audience))
    assert isinstance(error, AirflowFailException)
    text = str(error)
    assert text.count("recipient_whatsapp") == 1 and "'Recipient_WhatsApp ' is close" in text
    assert "row 0" not in text and sandbox.state.requests == 0


def test_a_bad_row_of_a_file_is_named_by_its_line(tmp_path, sandbox, sqlite_url, pepipost_conn):
    pepipost_conn(sandbox.url, sqlite_url)
    audience = tmp_path / "audience.csv"
    audience.write_text(f"recipient_whatsapp,name\n{NUMBERS[0]},Asha\n12345,Ravi\n")
    error, _ = run_operator(str(audience))
    assert "row 1 (line 3 of the file), field 'recipient_whatsapp'" in str(error)
    jsonl = tmp_path / "audience.jsonl"
    jsonl.write_text(json.dumps({"recipient_whatsapp": NUMBERS[0]}) + "\n\n" + json.dumps({"recipient_whatsapp": "1"}))
    error, _ = run_operator(str(jsonl))
    assert "row 1 (line 3 of the file)" in str(error)


def test_a_missing_file_is_named_with_what_to_check(tmp_path, sandbox, sqlite_url, pepipost_conn):
    pepipost_conn(sandbox.url, sqlite_url)
    missing = tmp_path / "nowhere" / "audience.csv"
    error, _ = run_operator(str(missing))
    assert isinstance(error, AirflowFailException)
    assert f"there is no file {missing}" in str(error) and "object storage" in str(error)
    assert "FileNotFoundError" not in str(error)


@pytest.mark.parametrize(
    "store", ["postgresql+psycopg2://pepipost:s3cret-pw@127.0.0.1:1/store", "sqlite:////proc/x/s.db"]
)
def test_an_unreachable_store_is_named_with_what_to_check(store, sandbox, pepipost_conn, monkeypatch):
    pepipost_conn(sandbox.url)
    monkeypatch.setenv("PEPIPOST_STATUS_STORE_URL", store)
    error, _ = run_operator(NUMBERS[:1])
    assert isinstance(error, StatusStoreUnavailable), error
    text = str(error)
    assert "could not be opened" in text and "status_store_conn_id" in text
    assert "s3cret-pw" not in text and sandbox.state.requests == 0


def test_a_store_connection_is_named_when_it_is_missing_or_unreachable(sandbox, pepipost_conn, use_store, monkeypatch):
    pepipost_conn(sandbox.url)
    error, _ = run_operator(NUMBERS[:1], status_store_conn_id="no_such_store")
    assert isinstance(error, StatusStoreUnavailable), error
    assert "Airflow connection 'no_such_store' could not be read" in str(error) and "Define that connection" in str(
        error
    )
    conn_id = use_store("postgresql+psycopg2://pepipost:s3cret-pw@127.0.0.1:1/store")
    error, _ = run_operator(NUMBERS[:1], status_store_conn_id=conn_id)
    assert isinstance(error, StatusStoreUnavailable), error
    text = str(error)
    assert f"(from Airflow connection '{conn_id}') could not be opened" in text
    assert f"Airflow connection '{conn_id}''s host, port" in text and "s3cret-pw" not in text
    assert sandbox.state.requests == 0


def test_a_csv_saved_by_a_spreadsheet_with_a_byte_order_mark_is_read(tmp_path, sandbox, sqlite_url, pepipost_conn):
    pepipost_conn(sandbox.url, sqlite_url)
    audience = tmp_path / "audience.csv"
    audience.write_bytes(("recipient_whatsapp,name\r\n" + f"{NUMBERS[0]},Asha\r\n").encode("utf-8-sig"))
    ids, _ = run_operator(str(audience))
    assert not isinstance(ids, Exception), ids
    assert sandbox.state.accepted_count == 1


def test_a_json_lines_file_without_a_number_key_says_so_once(tmp_path, sandbox, sqlite_url, pepipost_conn):
    pepipost_conn(sandbox.url, sqlite_url)
    audience = tmp_path / "audience.jsonl"
    audience.write_text("".join(json.dumps({"phone": n, "name": "Asha"}) + "\n" for n in NUMBERS[:50]))
    error, _ = run_operator(str(audience))
    assert isinstance(error, AirflowFailException)
    text = str(error)
    assert (
        "first row of the JSON Lines file" in text and "(line 1)" in text and "its keys are ['phone', 'name']" in text
    )
    assert text.count("recipient_whatsapp") == 1 and sandbox.state.requests == 0


@pytest.mark.timeout(30)
def test_a_store_server_that_never_answers_is_given_up_on_after_the_connect_timeout(monkeypatch):
    """A server that takes the connection and says nothing (a hung database, a half-open proxy):
    without a connect timeout the task waited as long as the kernel kept the socket."""
    from airflow_provider_pepipost.status import engines
    from airflow_provider_pepipost.status.store import StatusStore

    monkeypatch.setattr(engines, "PG_CONNECT_TIMEOUT", 1, raising=False)
    silent = socket.create_server(("127.0.0.1", 0))  # the kernel accepts; nobody ever answers
    try:
        url = f"postgresql+psycopg2://pepipost:s3cret-pw@127.0.0.1:{silent.getsockname()[1]}/store"
        started = time.monotonic()
        with pytest.raises(StatusStoreUnavailable) as raised:
            StatusStore(url)
        waited = time.monotonic() - started
    finally:
        silent.close()
        engines.dispose_engine(url)
    assert waited < 10, f"gave up only after {waited:.1f} s"
    assert "timeout expired" in str(raised.value) and "s3cret-pw" not in str(raised.value)

"""PepipostHook against real loopback servers: the sandbox, and pytest-httpserver for one-off faults."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

import pytest
from werkzeug import Response

from airflow_provider_pepipost.errors import (
    FailureKind,
    PepipostApiError,
    PepipostConfigError,
    PepipostNotSentError,
    PepipostOutcomeUnknownError,
)
from airflow_provider_pepipost.hooks.pepipost import PepipostHook, RetryLog, parse_retry_after
from airflow_provider_pepipost.messages import MediaMessage
from airflow_provider_pepipost.sandbox import DEFAULT_API_KEY
from tests.helpers import free_port

MESSAGE = MediaMessage("919833078369", "sandbox-source", attachment_id="media-1", caption="Hi", api_header="h-1")
SUCCESS = {"status": "success", "message": "Request received successfully.", "data": {"id": "id-1"}}


def failure(code: str, message: str = "nope") -> dict:
    return {"status": "failure", "error": {"code": code, "message": message}}


@pytest.fixture
def threaded_hook_for(pepipost_conn):
    """A hook for ``base_url``, for what only the threaded transport has (its requests adapter)."""

    def make(base_url: str, **extra: object) -> PepipostHook:
        pepipost_conn(base_url, **extra)
        return PepipostHook()

    return make


def test_sends_bearer_key_and_the_exact_body(httpserver, hook_for):
    httpserver.expect_oneshot_request(
        "/api/v2/message/",
        method="POST",
        headers={"Authorization": f"Bearer {DEFAULT_API_KEY}", "Content-Type": "application/json"},
    ).respond_with_json(SUCCESS)
    hook = hook_for(httpserver.url_for("").rstrip("/"))
    assert hook.send_message(MESSAGE) == "id-1"
    ((request, _),) = httpserver.log
    assert json.loads(request.data) == {"message": [MESSAGE.to_payload()]}


def test_connection_settings_from_uri_form(monkeypatch):
    monkeypatch.setenv(
        "AIRFLOW_CONN_PEPIPOST_DEFAULT",
        "pepipost://:secret-key@waapi.example.test/?source=src-9&timeout=12&endpoint=%2Fapi%2Fv2%2Fmessage%2Fnc",
    )
    settings = PepipostHook().settings
    assert settings.base_url == "https://waapi.example.test"
    assert settings.send_url == "https://waapi.example.test/api/v2/message/nc"
    assert settings.source == "src-9"
    assert settings.timeout == 12.0
    assert "secret-key" not in repr(settings)


def test_the_docs_uri_form_for_a_plain_http_endpoint_speaks_plain_http(sandbox, monkeypatch):
    """The connection page's URI form once made the hook speak TLS to a plain-HTTP server: keep them in step."""
    port = sandbox.url.rsplit(":", 1)[1]
    monkeypatch.setenv(
        "AIRFLOW_CONN_PEPIPOST_DEFAULT", f"pepipost://:{DEFAULT_API_KEY}@127.0.0.1:{port}/http?source=sandbox-source"
    )
    hook = PepipostHook()
    assert hook.settings.base_url == f"http://127.0.0.1:{port}"
    assert hook.send_message(MESSAGE)
    page = (Path(__file__).parents[3] / "docs" / "connection.md").read_text()
    assert "pepipost://:sandbox-api-key@127.0.0.1:8480/http?source=sandbox-source" in page


def test_default_base_url_and_bearer_prefix_in_the_password_is_not_doubled(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_PEPIPOST_DEFAULT", json.dumps({"conn_type": "pepipost", "password": "Bearer k1"}))
    hook = PepipostHook()
    assert hook.settings.base_url == "https://waapi.pepipost.com"
    assert hook.session.headers["Authorization"] == "Bearer k1"


def test_missing_key_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_PEPIPOST_DEFAULT", json.dumps({"conn_type": "pepipost", "host": "h"}))
    with pytest.raises(ValueError, match="has no API key: put the Pepipost API key in its password"):
        _ = PepipostHook().settings


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("timeout", "soon"),
        ("timeout", 0),
        ("connect_timeout", 0),
        ("deadline", 0),
        ("deadline", "nan"),
        ("deadline", "inf"),  # once stopped the deadline watchdog of the whole process
        ("deadline", True),
        ("max_answer_bytes", 0),
        ("max_answer_bytes", 10.7),
        ("max_retries", -1),
        ("max_retries", True),
        ("keepalive_idle_max", "nan"),
    ],
)
def test_an_extra_that_cannot_work_is_refused_naming_it(monkeypatch, name, value):
    monkeypatch.setenv(
        "AIRFLOW_CONN_PEPIPOST_DEFAULT",
        json.dumps({"conn_type": "pepipost", "password": "k", "extra": {name: value}}),
    )
    with pytest.raises(ValueError, match=f"extra '{name}' must be a finite"):
        _ = PepipostHook().settings


def test_an_api_key_with_an_invisible_character_is_refused_before_any_send(monkeypatch, sandbox):
    """A key pasted with a zero-width space once failed inside requests and left rows unknown."""
    conn = {"conn_type": "pepipost", "host": sandbox.url, "password": DEFAULT_API_KEY + "\u200b"}
    monkeypatch.setenv("AIRFLOW_CONN_PEPIPOST_DEFAULT", json.dumps(conn))
    with pytest.raises(PepipostConfigError, match="invisible or a non-ASCII character"):
        PepipostHook().send_message(MESSAGE)
    assert sandbox.state.requests == 0


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        ("8002", FailureKind.RECIPIENT),
        ("8003", FailureKind.RECIPIENT),
        ("8007", FailureKind.RECIPIENT),
        ("8001", FailureKind.MESSAGE),
        ("8006", FailureKind.MESSAGE),
        ("8004", FailureKind.JOB),
        ("8008", FailureKind.JOB),
        ("9999", FailureKind.MESSAGE),
    ],
)
def test_failure_bodies_become_classified_errors(httpserver, hook_for, code, kind):
    httpserver.expect_request("/api/v2/message/").respond_with_json(failure(code, " type is required."), status=400)
    with pytest.raises(PepipostApiError) as caught:
        hook_for(httpserver.url_for("").rstrip("/")).send_message(MESSAGE)
    assert caught.value.code == code
    assert caught.value.kind is kind
    assert caught.value.message == "type is required."
    assert len(httpserver.log) == 1  # none of these is retried


def test_failure_is_judged_by_the_body_even_with_http_200(httpserver, hook_for):
    httpserver.expect_request("/api/v2/message/").respond_with_json(failure("8003"), status=200)
    with pytest.raises(PepipostApiError, match="8003"):
        hook_for(httpserver.url_for("").rstrip("/")).send_message(MESSAGE)


def test_429_is_retried_after_the_retry_after_it_names(httpserver, hook_for):
    httpserver.expect_ordered_request("/api/v2/message/").respond_with_json(
        failure("429", "slow down"), status=429, headers={"Retry-After": "0.4"}
    )
    httpserver.expect_ordered_request("/api/v2/message/").respond_with_json(SUCCESS)
    hook = hook_for(httpserver.url_for("").rstrip("/"))
    started = time.monotonic()
    assert hook.send_message(MESSAGE) == "id-1"
    assert time.monotonic() - started >= 0.4
    assert len(httpserver.log) == 2


@pytest.mark.parametrize(
    "first",
    [
        Response(json.dumps(failure("8005", "technical error")), status=500, content_type="application/json"),
        Response(json.dumps(failure("8005", "technical error")), status=502, content_type="application/json"),
        Response("slow down", status=429),
        Response("<html>maintenance</html>", status=503, headers={"Retry-After": "0"}),
    ],
    ids=["vendor-failure-500", "vendor-failure-502", "429", "503-retry-after"],
)
def test_answers_that_say_the_vendor_did_not_process_it_are_retried(httpserver, hook_for, first):
    httpserver.expect_ordered_request("/api/v2/message/").respond_with_response(first)
    httpserver.expect_ordered_request("/api/v2/message/").respond_with_json(SUCCESS)
    assert hook_for(httpserver.url_for("").rstrip("/")).send_message(MESSAGE) == "id-1"


@pytest.mark.parametrize(
    "answer",
    [
        Response("<html><h1>502 Bad Gateway</h1></html>", status=502, content_type="text/html"),
        Response("upstream timed out", status=504),
        Response("{}", status=503),
        Response("oops", status=500),
        Response("<html>ok</html>", status=200, content_type="text/html"),
    ],
    ids=["502-html", "504", "503-without-retry-after", "500-text", "200-not-the-vendors"],
)
def test_answers_that_may_come_after_the_vendor_took_it_are_unknown_and_never_resent(httpserver, hook_for, answer):
    """A gateway's page may arrive after the vendor accepted the message: resending could send it twice."""
    httpserver.expect_request("/api/v2/message/").respond_with_response(answer)
    with pytest.raises(PepipostOutcomeUnknownError, match="may have been accepted"):
        hook_for(httpserver.url_for("").rstrip("/")).send_message(MESSAGE)
    assert len(httpserver.log) == 1


def test_retries_are_bounded(httpserver, hook_for):
    httpserver.expect_request("/api/v2/message/").respond_with_data("down", status=503, headers={"Retry-After": "0"})
    with pytest.raises(PepipostApiError) as caught:
        hook_for(httpserver.url_for("").rstrip("/"), max_retries=2).send_message(MESSAGE)
    assert caught.value.is_transient
    assert len(httpserver.log) == 3


def test_a_read_timeout_is_not_resent(httpserver, hook_for):
    def slow(_request):
        time.sleep(1.0)
        return Response(json.dumps(SUCCESS), content_type="application/json")

    httpserver.expect_request("/api/v2/message/").respond_with_handler(slow)
    with pytest.raises(PepipostOutcomeUnknownError, match="may have been accepted"):
        hook_for(httpserver.url_for("").rstrip("/"), timeout=0.3).send_message(MESSAGE)
    assert len(httpserver.log) <= 1
    time.sleep(0.8)
    assert len(httpserver.log) == 1


def test_a_refused_connection_is_not_sent_retried_then_named(hook_for):
    port = free_port()
    with pytest.raises(PepipostNotSentError) as caught:
        hook_for(f"http://127.0.0.1:{port}", max_retries=1).send_message(MESSAGE)
    assert caught.value.retryable
    assert "refused the connection" in str(caught.value)
    assert "API key" not in str(caught.value)


def test_success_without_an_id_is_an_unknown_outcome(httpserver, hook_for):
    httpserver.expect_request("/api/v2/message/").respond_with_json({"status": "success", "data": {}})
    with pytest.raises(PepipostOutcomeUnknownError):
        hook_for(httpserver.url_for("").rstrip("/")).send_message(MESSAGE)


def test_unexpected_body_is_quoted_short_and_without_the_key(httpserver, hook_for):
    httpserver.expect_request("/api/v2/message/").respond_with_data(
        f"<html>proxy error for key {DEFAULT_API_KEY}</html>" + "x" * 500, status=418
    )
    with pytest.raises(PepipostApiError) as caught:
        hook_for(httpserver.url_for("").rstrip("/")).send_message(MESSAGE)
    text = str(caught.value)
    assert DEFAULT_API_KEY not in text
    assert "proxy error" in text and len(text) < 400


def test_sends_to_the_sandbox_and_the_key_is_checked(sandbox, hook_for, pepipost_conn):
    assert hook_for(sandbox.url).send_message(MESSAGE)
    assert sandbox.state.accepted[0]["body"] == {"message": [MESSAGE.to_payload()]}
    pepipost_conn(sandbox.url)
    hook = PepipostHook()
    _ = hook.settings  # load, then swap the key for a wrong one
    object.__setattr__(hook.settings, "api_key", "wrong-key")
    with pytest.raises(PepipostApiError) as caught:
        hook.send_message(MESSAGE)
    assert caught.value.kind is FailureKind.JOB


def test_test_connection_tells_a_good_key_from_a_bad_one(sandbox, monkeypatch, pepipost_conn):
    pepipost_conn(sandbox.url)
    ok, text = PepipostHook().test_connection()
    assert ok, text
    assert text == f"Connection test passed: {sandbox.url} answered and took the API key. Nothing was sent."
    monkeypatch.setenv(
        "AIRFLOW_CONN_PEPIPOST_DEFAULT",
        json.dumps({"conn_type": "pepipost", "host": sandbox.url, "password": "not-the-key"}),
    )
    ok, text = PepipostHook().test_connection()
    assert not ok and "not-the-key" not in text
    # In the words of a connection test: no "send" to stop, one full stop after the vendor's words.
    assert text == (
        f'Connection test failed: {sandbox.url} answered Pepipost error 8004 (HTTP 401) "Client details not found". '
        "The API key was refused; check the connection's password."
    )
    assert sandbox.state.accepted_count == 0  # nobody was messaged


def test_test_connection_names_a_wrong_endpoint(httpserver, hook_for):
    httpserver.expect_request("/api/v2/message/").respond_with_data("Not Found", status=404)
    ok, text = hook_for(httpserver.url_for("").rstrip("/")).test_connection()
    assert not ok and text.startswith("Connection test failed: ") and "send" not in text
    assert "the endpoint was not found; check the connection's host and extra 'endpoint'" in text.lower()


def test_test_connection_reports_an_unreachable_host(hook_for):
    port = free_port()
    ok, text = hook_for(f"http://127.0.0.1:{port}").test_connection()
    assert not ok and text.startswith(f"Connection test failed: could not reach http://127.0.0.1:{port}: ")


def test_a_job_failure_of_a_send_has_one_full_stop_before_what_to_do():
    err = PepipostApiError("8004", "Client details not found.", http_status=401)
    assert str(err) == (
        "Pepipost error 8004 (HTTP 401): Client details not found. This stops the whole send: "
        "the API key was refused; check the connection's password."
    )
    assert str(PepipostApiError(None, "", http_status=404)).startswith("Pepipost error (HTTP 404). This stops")


def test_the_key_is_registered_with_the_secrets_masker(hook_for, sandbox):
    from airflow.sdk._shared.secrets_masker import redact

    _ = hook_for(sandbox.url).settings
    assert DEFAULT_API_KEY not in str(redact(f"key is {DEFAULT_API_KEY}"))


@pytest.mark.parametrize(("value", "expected"), [("3", 3.0), ("0.5", 0.5), (None, None), ("soon", None)])
def test_retry_after_parsing(value, expected):
    assert parse_retry_after(value) == expected


def test_retry_after_as_http_date():
    from email.utils import formatdate

    assert 1.0 < parse_retry_after(formatdate(time.time() + 5, usegmt=True)) <= 5.5


def test_a_store_url_in_the_connection_extra_is_refused_with_the_way_out(monkeypatch):
    """Airflow's API shows extras in plain text: a store password must not live there."""
    conn = {"conn_type": "pepipost", "password": "k", "extra": {"status_store_url": "postgresql://u:pw@db/x"}}
    monkeypatch.setenv("AIRFLOW_CONN_PEPIPOST_DEFAULT", json.dumps(conn))
    with pytest.raises(PepipostConfigError, match="status_store_conn_id"):
        _ = PepipostHook().settings


def test_retries_are_logged_in_summary_with_counts_that_add_up():
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger("test-retry-log")
    logger.addHandler(Collect())
    retry_log = RetryLog(logger, interval=60)
    for _ in range(39):
        retry_log.add("HTTP 429 (rate limited)", 1.5)
    retry_log.add("vendor code 8005", 4.0)
    retry_log.flush()
    assert len(lines) == 2  # the first at once, the rest in one line: not 40 lines for one outage
    assert "Retrying 1 send(s)" in lines[0]
    assert "Retried 39 send(s)" in lines[1] and "HTTP 429 (rate limited) x38" in lines[1]  # over when flushed
    assert "vendor code 8005 x1" in lines[1] and "up to 4.0s" in lines[1]


def test_the_adapter_keeps_the_pool_the_pool_manager_holds(httpserver, threaded_hook_for):
    """The adapter keeps the campaign's pool between sends (bench/send_limit.py), never one the
    pool manager no longer holds: after the adapter is closed, the next send finds the new one."""
    httpserver.expect_request("/api/v2/message/", method="POST").respond_with_json(SUCCESS)
    hook = threaded_hook_for(httpserver.url_for("").rstrip("/"))
    assert hook.send_message(MESSAGE) == "id-1"
    adapter = hook.session.get_adapter(hook.settings.send_url)
    (kept,) = adapter._pepipost_pools.values()
    assert hook.send_message(MESSAGE) == "id-1"
    assert next(iter(adapter._pepipost_pools.values())) is kept  # found once, used again
    adapter.close()
    assert hook.send_message(MESSAGE) == "id-1"
    (found,) = adapter._pepipost_pools.values()
    assert found is not kept
    assert list(adapter.poolmanager.pools._container.values()) == [found]
    assert len(httpserver.log) == 3


def test_a_cookie_the_server_sets_is_not_sent_back(httpserver, threaded_hook_for):
    """The API is stateless: a Set-Cookie (a load balancer's, say) is not kept between sends."""
    httpserver.expect_request("/api/v2/message/", method="POST").respond_with_response(
        Response(json.dumps(SUCCESS), headers={"Set-Cookie": "lb=node-7; Path=/"}, content_type="application/json")
    )
    hook = threaded_hook_for(httpserver.url_for("").rstrip("/"))
    assert hook.send_message(MESSAGE) == "id-1"
    assert hook.send_message(MESSAGE) == "id-1"
    assert [request.headers.get("Cookie") for request, _ in httpserver.log] == [None, None]


def test_get_conn_responses_are_requests_own_with_charset_and_cookies(httpserver, threaded_hook_for):
    """get_conn() hands out the hook's session, as Airflow's HTTP hooks do: the lean response of
    the hook's own sends must not reach other requests through it."""
    httpserver.expect_request("/text").respond_with_response(
        Response("é".encode("latin-1"), headers={"Set-Cookie": "lb=node-7; Path=/"},
                 content_type="text/plain; charset=ISO-8859-1")
    )  # fmt: skip
    hook = threaded_hook_for(httpserver.url_for("").rstrip("/"))
    answer = hook.get_conn().get(httpserver.url_for("/text"))
    assert answer.encoding == "ISO-8859-1"
    assert answer.text == "é"
    assert answer.cookies.get("lb") == "node-7"


def test_other_requests_through_get_conn_keep_no_pool_of_the_hooks(httpserver, threaded_hook_for):
    """The adapter keeps pools for the hook's own few URLs only: a session that also fetched
    hundreds of URLs through get_conn() holds no cache entry for each."""
    httpserver.expect_request("/api/v2/message/", method="POST").respond_with_json(SUCCESS)
    httpserver.expect_request("/x").respond_with_json({})
    hook = threaded_hook_for(httpserver.url_for("").rstrip("/"))
    assert hook.send_message(MESSAGE) == "id-1"
    session = hook.get_conn()
    for page in range(200):
        session.get(httpserver.url_for("/x") + f"?page={page}")
    adapter = session.get_adapter(hook.settings.send_url)
    assert len(adapter._pepipost_pools) == 1


def test_a_path_that_is_not_ascii_is_sent_percent_quoted_as_requests_quotes_it(httpserver, hook_for):
    # The event loop's request head once failed to encode it: "could not be made", a campaign's fatal stop.
    httpserver.expect_oneshot_request("/wä/api/v2/message/", method="POST").respond_with_json(SUCCESS)
    hook = hook_for(httpserver.url_for("/wä").rstrip("/"))
    assert hook.send_message(MESSAGE) == "id-1"
    ((request, _),) = httpserver.log
    assert request.environ["REQUEST_URI"] == "/w%C3%A4/api/v2/message/"


def loop_request_head(hook: PepipostHook) -> bytes:
    """The head the event loop's client sends for the hook's send URL (its ``%d``: the body's length)."""

    async def head() -> bytes:
        try:
            return hook._loop_client(hook.settings.endpoint)[1]
        finally:
            hook.aclose()

    return asyncio.run(head())


def test_an_international_host_is_named_as_requests_names_it_on_the_event_loop(pepipost_conn):
    pepipost_conn("https://bücher.example:8443")
    sent_head = loop_request_head(PepipostHook())
    assert b"\r\nHost: xn--bcher-kva.example:8443\r\n" in sent_head
    assert sent_head.startswith(b"POST /api/v2/message/ HTTP/1.1\r\n")


@pytest.mark.parametrize(
    ("base_url", "host"),
    [
        ("http://127.0.0.1:80", "127.0.0.1"),
        ("https://waapi.example.test:443", "waapi.example.test"),
        ("https://waapi.example.test:8443", "waapi.example.test:8443"),
        ("http://[::1]:80", "[::1]"),
        ("http://[::1]:8080", "[::1]:8080"),
    ],
)
def test_the_event_loop_names_the_host_as_urllib3_names_it(base_url, host, pepipost_conn):
    pepipost_conn(base_url)
    assert f"\r\nHost: {host}\r\n".encode() in loop_request_head(PepipostHook())

"""PepipostHook: the Airflow connection, one pooled HTTP session, and the send call with its retries."""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import socket
import ssl
import threading
import time
import weakref
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any
from urllib.parse import urlsplit

import msgspec
import requests
from airflow.sdk import BaseHook
from requests.adapters import HTTPAdapter
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter
from urllib3.connection import port_by_scheme
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError

from airflow_provider_pepipost import limits
from airflow_provider_pepipost.connection_form import (
    CONN_TYPE,
    DEFAULT_BASE_URL,
    DEFAULT_CONN_ID,
    DEFAULT_ENDPOINT,
    EXTRA_FIELDS,
    UI_FIELD_BEHAVIOUR,
)
from airflow_provider_pepipost.consent import ConsentDefaults, ConsentRow, build_consent_row, consent_body
from airflow_provider_pepipost.errors import (
    PepipostApiError,
    PepipostConfigError,
    PepipostError,
    PepipostNotSentError,
    PepipostOutcomeUnknownError,
)
from airflow_provider_pepipost.hooks.loop_transport import (
    MAX_HEAD_BYTES,
    ConnectTimedOut,
    LoopClient,
    LoopSettings,
    TransportFailure,
    ssl_context_for,
)
from airflow_provider_pepipost.hooks.transport import Fate, TrackingAdapter, begin_request, end_request, fate_of
from airflow_provider_pepipost.messages import build_all, normalize_phone
from airflow_provider_pepipost.outgoing import OutgoingMessage, request_body

log = logging.getLogger(__name__)

EXCERPT_CHARS = 200
# The consent API (docs/pepipost/template-and-consent.md, "Consent"), beside the send endpoint.
CONSENT_MANAGE_PATH = "/api/v2/consent/manage/"
CONSENT_CHECK_PATH = "/api/v2/consent/"
# A request body as bytes: the bytes json.dumps(separators=(",", ":"), ensure_ascii=False) gives,
# encoded as UTF-8, at a fifteenth of its CPU (tests/unit/hooks/test_body_encoding.py).
encode_json = msgspec.json.Encoder().encode

# A Retry-After far beyond our own backoff ceiling is honoured up to this many times the ceiling.
RETRY_AFTER_CEILING_FACTOR = 10


def mask_secret(secret: str) -> None:
    """Hide ``secret`` in every log line of this task (and its supervisor)."""
    try:
        from airflow.sdk.log import mask_secret as airflow_mask_secret
    except ImportError:  # Airflow 3.1
        from airflow.sdk.execution_time.secrets_masker import (  # type: ignore[no-redef]  # the same function
            mask_secret as airflow_mask_secret,
        )
    airflow_mask_secret(secret)


@dataclass(frozen=True)
class PepipostSettings:
    """What the hook reads from the connection, checked once."""

    base_url: str
    api_key: str
    source: str | None
    endpoint: str
    timeout: float
    connect_timeout: float
    max_retries: int
    backoff_max: float
    deadline: float
    max_answer_bytes: int
    keepalive_idle_max: float

    @property
    def send_url(self) -> str:
        return self.base_url.rstrip("/") + "/" + self.endpoint.lstrip("/")

    def __repr__(self) -> str:  # the dataclass repr would print the key
        return f"PepipostSettings(base_url={self.base_url!r}, source={self.source!r}, endpoint={self.endpoint!r})"


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header: a number of seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class PepipostHook(BaseHook):
    """Talks to Pepipost's WhatsApp API with the key and defaults of an Airflow connection.

    :param pepipost_conn_id: connection of type ``pepipost``: host = base URL, password = API key,
        extra ``source`` = default source id; timeouts and retries in the other extras.
    :param pool_size: HTTP connections kept open; size it to the sending threads.
    """

    conn_name_attr = "pepipost_conn_id"
    default_conn_name = DEFAULT_CONN_ID
    conn_type = CONN_TYPE
    hook_name = "Pepipost"

    def __init__(self, pepipost_conn_id: str = default_conn_name, *, pool_size: int = 10, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pepipost_conn_id = pepipost_conn_id
        self.pool_size = pool_size

    # -- connection -----------------------------------------------------------------------------

    @classmethod
    def get_connection_form_widgets(cls) -> dict[str, Any]:
        """Form fields for Airflow 3.1; 3.2+ reads the same fields from the provider info."""
        from flask_appbuilder.fieldwidgets import BS3TextFieldWidget
        from flask_babel import lazy_gettext
        from wtforms import IntegerField, StringField

        widgets: dict[str, Any] = {}
        for name, (label, kind, default, description) in EXTRA_FIELDS.items():
            field_class = IntegerField if kind == "integer" else StringField
            widgets[name] = field_class(
                lazy_gettext(label), widget=BS3TextFieldWidget(), default=default, description=description
            )
        return widgets

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return UI_FIELD_BEHAVIOUR

    @cached_property
    def settings(self) -> PepipostSettings:
        conn = self.get_connection(self.pepipost_conn_id)
        extra = conn.extra_dejson
        if extra.get("status_store_url"):
            # A URL in an extra comes back in plain text from Airflow's API, password included.
            raise PepipostConfigError(
                f"connection '{self.pepipost_conn_id}': extra 'status_store_url' is no longer read. Put the store "
                "in an Airflow connection of type postgres or sqlite and name it with the operator's and sensor's "
                "status_store_conn_id, or [pepipost] status_store_conn_id for all of them"
            )
        api_key = (conn.password or "").strip()
        if not api_key:
            raise PepipostConfigError(
                f"connection '{self.pepipost_conn_id}' has no API key: put the Pepipost API key in its password"
            )
        mask_secret(api_key)
        if api_key.lower().startswith("bearer "):
            api_key = api_key[7:].strip()  # the hook adds the prefix itself
            mask_secret(api_key)
        if not api_key.isascii() or not api_key.isprintable() or " " in api_key:
            raise PepipostConfigError(
                f"connection '{self.pepipost_conn_id}': the API key holds a space, an invisible or a non-ASCII "
                "character (pasted from a document?): copy it again from the vendor's dashboard"
            )

        def number(name: str, cast: type, *, positive: bool = True) -> Any:
            """A finite number (``cast``), above 0 where 0 cannot work, else at least 0."""
            raw = extra.get(name, EXTRA_FIELDS[name][2])
            value = None
            if not isinstance(raw, bool):
                try:
                    value = cast(raw) if cast is float else cast(str(raw).strip())
                except (TypeError, ValueError):
                    value = None
            if value is None or not math.isfinite(value) or value < 0 or (positive and value == 0):
                bound = "above 0" if positive else "0 or more"
                raise PepipostConfigError(
                    f"connection '{self.pepipost_conn_id}': extra '{name}' must be a finite "
                    f"{'whole ' if cast is int else ''}number {bound}, not {raw!r}"
                )
            return value

        return PepipostSettings(
            base_url=self._base_url(conn),
            api_key=api_key,
            source=extra.get("source") or None,
            endpoint=extra.get("endpoint") or DEFAULT_ENDPOINT,
            timeout=number("timeout", float),
            connect_timeout=number("connect_timeout", float),
            max_retries=number("max_retries", int, positive=False),
            backoff_max=number("backoff_max", float),
            deadline=number("deadline", float),
            max_answer_bytes=number("max_answer_bytes", int),
            keepalive_idle_max=number("keepalive_idle_max", float),
        )

    @staticmethod
    def _base_url(conn: Any) -> str:
        host = (conn.host or "").strip()
        if not host:
            return DEFAULT_BASE_URL
        if "://" not in host:
            host = f"{conn.schema or 'https'}://{host}"
        if conn.port and host.count(":") < 2:
            host = f"{host.rstrip('/')}:{conn.port}"
        return host.rstrip("/")

    @cached_property
    def session(self) -> requests.Session:
        """One pooled session per hook; retries are ours (below), so the adapter makes none."""
        session = requests.Session()
        adapter = TrackingAdapter(
            idle_max=self.settings.keepalive_idle_max,
            pool_connections=1,
            pool_maxsize=max(1, self.pool_size),
            max_retries=0,
        )
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        session.headers.update(
            {
                "Authorization": f"Bearer {self.settings.api_key}",
                "Content-Type": "application/json",
                "Accept": "application/json",
                "User-Agent": "airflow-provider-pepipost",
            }
        )
        return session

    def get_conn(self) -> requests.Session:
        """The pooled session, as Airflow's HTTP hooks give it."""
        return self.session

    @cached_property
    def _retry_log(self) -> RetryLog:
        return RetryLog(log)

    def _prepared(self, path: str) -> tuple[requests.PreparedRequest, dict[str, Any], HTTPAdapter]:
        """A POST to ``path`` prepared once, the session's proxy/TLS settings merged once, and the
        adapter that sends it.

        Session.post re-merges headers, cookies and environment settings on every call, and
        Session.send dispatches hooks and fills a cookie jar; for a campaign that is most of the
        client's CPU (bench/send_limit.py). The adapter is called directly.
        """
        cache = self.__dict__.setdefault("_prepared_requests", {})
        if path not in cache:
            url = self.settings.base_url.rstrip("/") + "/" + path.lstrip("/")
            prepared = self.session.prepare_request(requests.Request("POST", url, data=b"{}"))
            environment = self.session.merge_environment_settings(url, {}, None, None, None)
            cache[path] = (prepared, environment, self.session.get_adapter(url))
        return cache[path]

    def close(self) -> None:
        """Close the pooled connections; the next send opens new ones."""
        self.__dict__.pop("_prepared_requests", None)
        session = self.__dict__.pop("session", None)
        if session is not None:
            session.close()
        self.flush_retry_log()

    def flush_retry_log(self) -> None:
        """Log the summary of the retries not logged yet (a campaign's last, before its last progress line)."""
        if "_retry_log" in self.__dict__:
            self._retry_log.flush()

    # -- sending --------------------------------------------------------------------------------

    def send_message(self, message: OutgoingMessage) -> str:
        """Send one message of any kind (media, template...); return its message id.

        Retries what the vendor cannot have processed (see ``post_json``). Raises
        ``PepipostApiError`` when the vendor refuses it, ``PepipostNotSentError`` when it could not
        be reached, and ``PepipostOutcomeUnknownError`` when it may have been processed.
        """
        return self.post_message_body(request_body(message))

    def post_message_body(self, body: dict[str, Any], *, deadline: float | None = None) -> str:
        return message_id_of(self.post_json(self.settings.endpoint, body, deadline=deadline), self._redact)

    # -- consent --------------------------------------------------------------------------------

    def manage_consent(self, kind: str, recipients: Sequence[ConsentRow | Mapping[str, Any]]) -> dict[str, Any]:
        """Record an opt-in or opt-out (``kind``: ``optin``, ``optout``) for these recipients.

        ``recipients`` are ``ConsentRow``s or dicts with ``recipient``, ``source`` (required, at
        most 25 characters), optional ``user_agent`` and ``ip``; every one is checked before the
        call, and a ``MessageValidationError`` names the bad ones. Returns the vendor's answer.
        Raises as ``post_json``: a refusal (``PepipostApiError``, mostly 8006) is the whole batch's,
        since the vendor does not say which row was wrong.
        """
        rows = build_all(recipients, ConsentDefaults(), _consent_row)
        if not rows:
            raise ValueError("recipients: is empty; a consent call needs at least one")
        return self.post_json(CONSENT_MANAGE_PATH, consent_body(kind, rows))

    def check_consent(self, number: str) -> dict[str, Any] | None:
        """The opt-in the vendor holds for one number (``ip``, ``phone_number``, ``optin_source``,
        ``user_agent``, ``created_date``), or None when it holds none."""
        try:
            phone = normalize_phone(number)
        except ValueError as err:
            raise ValueError(f"number: {err}") from None
        try:
            answer = self.post_json(CONSENT_CHECK_PATH, {"phone_number": phone})
        except PepipostApiError as err:
            # The vendor's "Optin details not found for <number>" comes without a code.
            if err.code is None and "not found" in err.message.lower():
                return None
            raise
        data = answer.get("data")
        return data if isinstance(data, dict) else None

    def post_json(self, path: str, body: dict[str, Any], *, deadline: float | None = None) -> dict[str, Any]:
        """POST ``body`` to ``path`` of the vendor's API; return the answer's JSON object.

        The one request path of every endpoint: auth, retries, error mapping, masking, size and
        time limits. Only what the vendor cannot have processed is retried, with exponential
        backoff and jitter, honouring Retry-After: a failure before the request left, a failure
        body, 429, 503 with Retry-After. The table "Which answers are retried" in docs/sending.md says why.

        ``deadline`` (``time.monotonic()`` seconds): by then the call is over, retries and waits
        included, whatever Retry-After asks (a notifier's bound on a whole notification).
        """
        data = encode_json(body)
        stop: Any = stop_after_attempt(self.settings.max_retries + 1)
        wait: Any = self._wait_before_retry
        if deadline is not None:
            # No retry whose wait (a Retry-After of minutes) would end past the deadline.
            stop = stop | (lambda retry_state: self._wait_before_retry(retry_state) >= deadline - time.monotonic())
            wait = lambda retry_state: min(self._wait_before_retry(retry_state), max(deadline - time.monotonic(), 0))  # noqa: E731
        retrying = Retrying(
            stop=stop,
            wait=wait,
            retry=retry_if_exception(_worth_retrying),
            before_sleep=self._log_retry,
            reraise=True,
        )
        return retrying(self._post_once, path, data, deadline)

    def _post_once(self, path: str, data: bytes, deadline: float | None = None) -> dict[str, Any]:
        settings = self.settings
        template, environment, adapter = self._prepared(path)
        request = template.copy()
        request.prepare_body(data, None)
        left = max(deadline - time.monotonic(), 0.001) if deadline is not None else float("inf")
        progress = begin_request(min(settings.deadline, left))
        try:
            try:
                response = adapter.send(
                    request,
                    timeout=(min(settings.connect_timeout, left), min(settings.timeout, left)),
                    **{**environment, "stream": True},  # the body is read below, under the size cap
                )
                content = self._read_capped(response, progress)
            except requests.exceptions.RequestException as err:
                raise self._classify_exception(err, progress) from None
            except (PepipostOutcomeUnknownError, PepipostNotSentError):
                raise
            except Exception as err:
                # Not the network's: a bug or a setting requests refuses. Before the request left,
                # it is not sent (and no retry will mend it); after, the vendor may have it.
                if not progress.sent:
                    raise self._could_not_be_made(err) from None
                raise PepipostOutcomeUnknownError(
                    f"the answer could not be read ({type(err).__name__}); the message may have been accepted"
                ) from None
        finally:
            end_request(progress)
        return self._parse_answer(response.status_code, response.headers, content)

    # -- sending on an event loop (hooks/loop_transport.py) --------------------------------------

    def event_loop_possible(self) -> bool:
        """Whether the sends can go through the event-loop transport: it speaks no proxy, so not
        when HTTPS_PROXY / HTTP_PROXY (less NO_PROXY) applies to the send URL."""
        url = self.settings.send_url
        return not requests.utils.select_proxy(url, requests.utils.get_environ_proxies(url))

    async def asend_message(self, message: OutgoingMessage) -> str:
        """``send_message`` on the running event loop: the same retries, errors and limits."""
        return await self.apost_message_body(request_body(message))

    async def apost_message_body(self, body: dict[str, Any]) -> str:
        return message_id_of(await self.apost_json(self.settings.endpoint, body), self._redact)

    async def apost_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """``post_json`` on the running event loop, through the event-loop transport."""
        data = encode_json(body)
        # post_json's retries, as tenacity makes them (its wait, the same rule of what is retried):
        # AsyncRetrying's own work was a third of the loop's CPU a send (bench/send_limit.py).
        attempt = RetryCallState(None, None, (), {})  # type: ignore[arg-type]  # only its count and outcome are read
        while True:
            try:
                return await self._apost_once(path, data)
            except Exception as err:
                if attempt.attempt_number > self.settings.max_retries or not _worth_retrying(err):
                    raise
                attempt.set_exception((type(err), err, err.__traceback__))
                wait = self._wait_before_retry(attempt)
                self._retry_log.add(retry_cause(err), wait)
                await asyncio.sleep(wait)
                attempt.prepare_for_next_attempt()

    async def _apost_once(self, path: str, data: bytes) -> dict[str, Any]:
        try:
            client, head = self._loop_client(path)
            request = head % len(data) + data
        except Exception as err:  # a setting (a CA bundle that is not there): nothing was written
            raise self._could_not_be_made(err) from None
        try:
            answer = await client.exchange(request)
        except TransportFailure as failure:
            raise self._loop_failure(failure) from None
        return self._parse_answer(answer.status, answer.headers, answer.body)

    def aclose(self) -> None:
        """Close the running event loop's connections (call on that loop, before it closes)."""
        clients = self.__dict__.get("_loop_clients")
        if clients:
            for client, _ in clients.pop(asyncio.get_running_loop(), {}).values():
                client.close()

    def _loop_client(self, path: str) -> tuple[LoopClient, bytes]:
        """The running loop's client for ``path``'s origin, and the request head (``%d``: the body's length)."""
        per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, tuple[LoopClient, bytes]]]
        per_loop = self.__dict__.get("_loop_clients")  # type: ignore[assignment]
        if per_loop is None:
            per_loop = self.__dict__["_loop_clients"] = weakref.WeakKeyDictionary()
        loop = asyncio.get_running_loop()
        clients = per_loop.get(loop)
        if clients is None:
            clients = per_loop[loop] = {}
        found = clients.get(path)
        if found is None:
            settings = self.settings
            prepared, environment, _ = self._prepared(path)
            # As requests sends it: the host IDNA-encoded, the path and query percent-quoted.
            url = prepared.url or ""
            parts = urlsplit(url)
            client = LoopClient(
                url,
                LoopSettings(
                    connect_timeout=settings.connect_timeout,
                    read_timeout=settings.timeout,
                    deadline=settings.deadline,
                    max_answer_bytes=settings.max_answer_bytes,
                    idle_max=settings.keepalive_idle_max,
                    pool_size=max(1, self.pool_size),
                ),
                ssl_context_for(environment.get("verify", True), environment.get("cert"))
                if parts.scheme == "https"
                else None,
            )
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            host = parts.netloc.rpartition("@")[2]
            if parts.port is not None and parts.port == port_by_scheme.get(parts.scheme):
                host = host.rpartition(":")[0]  # as urllib3 names it: no default port
            headers = {"Host": host, **self.session.headers}
            headers.pop("Accept-Encoding", None)  # the answer is read as it comes, never decoded
            lines = [f"POST {target} HTTP/1.1", *(f"{name}: {value}" for name, value in headers.items())]
            head = ("\r\n".join(lines).replace("%", "%%") + "\r\nContent-Length: %d\r\n\r\n").encode("latin-1")
            found = clients[path] = (client, head)
        return found

    def _loop_failure(self, failure: TransportFailure) -> PepipostError:
        """The event-loop transport's failure in the threaded transport's words."""
        if failure.unexpected and failure.cause is not None:
            return self._could_not_be_made(failure.cause)
        if failure.over == -2:
            return PepipostOutcomeUnknownError(
                f"the answer's head, chunk framing or trailers ran past {MAX_HEAD_BYTES} bytes; "
                "the message may have been accepted"
            )
        if failure.over is not None:
            return self._too_large(failure.status, failure.over)
        if failure.fate is Fate.NOT_SENT:
            return describe_not_sent(failure.cause or failure, self.settings)
        if failure.fate is Fate.PAST_DEADLINE:
            return self._past_deadline(failure.status)
        if failure.fate is Fate.NO_ANSWER:
            return PepipostOutcomeUnknownError(
                f"no answer within {self.settings.timeout:g}s after the request was sent; it may have been accepted"
            )
        cause = failure.cause
        reason = type(cause).__name__ + (f": {str(cause)[:EXCERPT_CHARS]}" if str(cause) else "") if cause else "closed"
        if failure.status is not None:
            return PepipostOutcomeUnknownError(
                f"the answer (HTTP {failure.status}) broke off ({reason}); the message may have been accepted"
            )
        return PepipostOutcomeUnknownError(
            f"the connection dropped after the request was sent ({reason}); it may have been accepted"
        )

    def _read_capped(self, response: requests.Response, progress: Any) -> bytes:
        """The whole answer, or unknown past ``max_answer_bytes`` (the answer never ends, or is a flood)."""
        limit = self.settings.max_answer_bytes
        try:
            declared = int(response.headers.get("Content-Length", "-1"))
        except ValueError:
            declared = -1
        chunks: list[bytes] = []
        size = 0
        try:
            if declared > limit:
                raise self._too_large(response.status_code, declared)
            for chunk in response.raw.stream(16384, decode_content=True):
                size += len(chunk)
                if size > limit:
                    raise self._too_large(response.status_code, -1)
                chunks.append(chunk)
        except PepipostOutcomeUnknownError:
            response.close()  # the connection is not reused: its rest is unread
            raise
        except Exception as err:
            response.close()
            if progress.expired:
                raise self._past_deadline(response.status_code) from None
            raise PepipostOutcomeUnknownError(
                f"the answer (HTTP {response.status_code}) broke off ({type(err).__name__}); "
                "the message may have been accepted"
            ) from None
        return b"".join(chunks)

    def _could_not_be_made(self, err: BaseException) -> PepipostNotSentError:
        """Not the network's failure, before anything was written: a bug or a setting; no retry mends it."""
        return PepipostNotSentError(
            f"the request to {self.settings.base_url} could not be made ({type(err).__name__}: "
            f"{self._redact(str(err))[:EXCERPT_CHARS]}); nothing was sent",
            retryable=False,
        )

    def _too_large(self, status: int | None, declared: int) -> PepipostOutcomeUnknownError:
        """An answer over ``max_answer_bytes``: as it declared (``declared`` >= 0), or as it ran past."""
        limit = self.settings.max_answer_bytes
        if declared >= 0:
            said = f"declares {declared} bytes, over the {limit}-byte limit"
        else:
            said = f"ran past the {limit}-byte limit"
        return PepipostOutcomeUnknownError(f"the answer (HTTP {status}) {said}; the message may have been accepted")

    def _past_deadline(self, status: int | None = None) -> PepipostOutcomeUnknownError:
        answer = f"the answer (HTTP {status}) was not complete" if status else "no complete answer came"
        return PepipostOutcomeUnknownError(
            f"{answer} within the {self.settings.deadline:g}s deadline (extra 'deadline'); "
            "the message may have been accepted"
        )

    def _classify_exception(self, err: requests.exceptions.RequestException, progress: Any) -> Exception:
        """Not sent (retry) when the request never fully left; unknown (never resend) when it did."""
        read_timeout = isinstance(err, requests.exceptions.ReadTimeout)
        fate = fate_of(sent=progress.sent, expired=progress.expired, read_timeout=read_timeout)
        if fate is Fate.NOT_SENT:
            return describe_not_sent(err, self.settings)
        if fate is Fate.PAST_DEADLINE:
            return self._past_deadline()
        if fate is Fate.NO_ANSWER:
            return PepipostOutcomeUnknownError(
                f"no answer within {self.settings.timeout:g}s after the request was sent; it may have been accepted"
            )
        return PepipostOutcomeUnknownError(
            f"the connection dropped after the request was sent ({_reason(err)}); it may have been accepted"
        )

    def _parse_answer(self, status: int, headers: Mapping[str, str], content: bytes) -> dict[str, Any]:
        """The vendor's JSON answer; failures mapped by what they say about the request's fate.

        ``headers``: the answer's, looked up by lower-case names (requests' are case-insensitive).
        """
        retry_after = parse_retry_after(headers.get("retry-after"))
        try:
            body = json.loads(content) if content else None
        except ValueError:
            body = None
        if isinstance(body, dict) and body.get("status") == "failure":
            # The vendor's own refusal: it did not process the request.
            error = body.get("error")
            if not isinstance(error, dict):
                error = {}
            code = error.get("code")
            raise PepipostApiError(
                str(code) if code is not None else None,
                self._redact(str(error.get("message") or "no error message").strip())[:EXCERPT_CHARS],
                http_status=status,
                retry_after=retry_after,
            )
        if isinstance(body, dict) and 200 <= status < 300:
            return body
        if 100 <= status < 200:
            # An interim answer taken for the answer (http.client skips only 100 Continue): the
            # real one may be an acceptance. Never a refusal, which a later try would resend.
            raise PepipostOutcomeUnknownError(
                f"HTTP {status}, an interim answer, came where the answer was due; the message may have been accepted"
            )
        excerpt = self._excerpt(content)
        if status == 429 or (status == 503 and retry_after is not None):
            # Throttled or shedding load: the request was turned away before any work.
            raise PepipostApiError(None, f"busy: {excerpt}", http_status=status, retry_after=retry_after)
        if status >= 500 or 200 <= status < 300:
            # A gateway's page, or a 2xx that is not the vendor's: it may have passed the request on.
            raise PepipostOutcomeUnknownError(
                f"HTTP {status} without the vendor's answer ({excerpt}); the message may have been accepted"
            )
        if 300 <= status < 400:
            raise PepipostApiError(
                None,
                f"the endpoint redirects to {headers.get('location', '?')!r}: set the connection's host "
                "to the address it names",
                http_status=status,
            )
        raise PepipostApiError(None, f"unexpected answer: {excerpt}", http_status=status, retry_after=retry_after)

    def _wait_before_retry(self, retry_state: Any) -> float:
        err = retry_state.outcome.exception() if retry_state.outcome else None
        backoff = wait_exponential_jitter(multiplier=0.5, max=self.settings.backoff_max)(retry_state)
        retry_after = getattr(err, "retry_after", None)
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.settings.backoff_max * RETRY_AFTER_CEILING_FACTOR)
        return backoff

    def _log_retry(self, retry_state: Any) -> None:
        err = retry_state.outcome.exception() if retry_state.outcome else None
        self._retry_log.add(retry_cause(err), retry_state.upcoming_sleep)

    def _excerpt(self, content: bytes) -> str:
        text = content[: EXCERPT_CHARS * 4].decode("utf-8", "replace")
        return repr(self._redact(text)[:EXCERPT_CHARS]) + (" ..." if len(content) > EXCERPT_CHARS else "")

    def _redact(self, text: str) -> str:
        key = self.settings.api_key
        return text.replace(key, "***") if key else text

    # -- connection test ------------------------------------------------------------------------

    def test_connection(self) -> tuple[bool, str]:
        """Check reachability and the key with a body the API must refuse: nobody is messaged.

        The body names no recipient, so a good key earns a validation error (8001/8006) and a
        bad key an authentication error (8004, 401, 403).
        """
        probe = {"message": [{"message_type": "media"}]}
        data = json.dumps(probe).encode()
        try:
            base = self.settings.base_url
            answer = self._post_once(self.settings.endpoint, data)
        except PepipostApiError as err:
            if err.code in ("8001", "8006"):
                return True, f"Connection test passed: {base} answered and took the API key. Nothing was sent."
            return False, connection_test_failure(base, err)
        except (PepipostNotSentError, PepipostOutcomeUnknownError) as err:
            return False, f"Connection test failed: could not reach {base}: {err}. Check the host and port."
        except Exception as err:
            return False, f"Connection test failed: {type(err).__name__}: {self._redact(str(err))}"
        return False, (
            f"Connection test failed: {base} took a message without a recipient "
            f"({self._redact(str(answer))[:100]}), which Pepipost refuses: is the host Pepipost's API?"
        )


def connection_test_failure(base_url: str, err: PepipostApiError) -> str:
    """A refusal of the connection test's probe, in the words of a connection test (not of a send)."""
    said = err.message.strip().rstrip(".").strip()
    quoted = f' "{said}"' if said else ""
    text = f"Connection test failed: {base_url} answered {err.label}{quoted}."
    if err.hint:
        return f"{text} {err.hint[0].upper()}{err.hint[1:]}"
    return f"{text} Check the host, the port and extra 'endpoint'."


def _consent_row(item: Any, defaults: ConsentDefaults, row: int) -> tuple[ConsentRow | None, list[Any]]:
    """A ``ConsentRow`` as it is (built and checked already), anything else checked."""
    return (item, []) if isinstance(item, ConsentRow) else build_consent_row(item, defaults, row)


def message_id_of(answer: dict[str, Any], redact: Any = str) -> str:
    """The message id of a send's success answer, or unknown when the answer does not give one."""
    data = answer.get("data")
    message_id = data.get("id") if isinstance(data, dict) else None
    if answer.get("status") == "success" and isinstance(message_id, str) and message_id:
        if len(message_id) <= limits.MESSAGE_ID_MAX and not limits.text_problem(message_id):
            return message_id
        raise PepipostOutcomeUnknownError(
            f"the vendor accepted it, but its id ({len(message_id)} characters) is not one the ledger can keep"
        )
    raise PepipostOutcomeUnknownError(
        f"the answer is not the vendor's success shape: {redact(repr(answer))[:EXCERPT_CHARS]}"
    )


def _worth_retrying(err: BaseException) -> bool:
    if isinstance(err, PepipostNotSentError):
        return err.retryable
    return getattr(err, "is_transient", False)


def retry_cause(err: BaseException | None) -> str:
    """A short name for why a send is retried, for the summarised retry log."""
    if isinstance(err, PepipostApiError):
        if err.code:
            return f"vendor code {err.code}"
        return "HTTP 429 (rate limited)" if err.http_status == 429 else f"HTTP {err.http_status}"
    if isinstance(err, PepipostNotSentError):
        return "could not connect"
    return type(err).__name__


class RetryLog:
    """Retries summarised: the first one at once, then one line per interval with the counts by cause."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self.logger = logger
        self.interval = interval
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._longest_wait = 0.0
        self._last = float("-inf")

    def add(self, cause: str, wait: float) -> None:
        with self._lock:
            self._counts[cause] += 1
            self._longest_wait = max(self._longest_wait, wait)
            if time.monotonic() - self._last >= self.interval:
                self._emit()

    def flush(self) -> None:
        """The last summary: those retries are over by now, and it says so."""
        with self._lock:
            if self._counts:
                self._emit(done=True)

    def _emit(self, done: bool = False) -> None:
        causes = ", ".join(f"{cause} x{count}" for cause, count in self._counts.most_common())
        self.logger.warning(
            "%s %d send(s) that the vendor did not process (%s); waits up to %.1fs",
            "Retried" if done else "Retrying", sum(self._counts.values()), causes, self._longest_wait,
        )  # fmt: skip
        self._counts.clear()
        self._longest_wait = 0.0
        self._last = time.monotonic()


def _reason(err: BaseException) -> str:
    inner = err.args[0] if err.args else err
    reason = getattr(inner, "reason", inner)
    return type(reason).__name__ + (f": {str(reason)[:EXCERPT_CHARS]}" if str(reason) else "")


def _innermost(err: BaseException) -> BaseException:
    """The root cause under requests' and urllib3's wrappers."""
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        inner = err.args[0] if err.args and isinstance(err.args[0], BaseException) else None
        inner = getattr(err, "reason", None) if isinstance(getattr(err, "reason", None), BaseException) else inner
        inner = inner or err.__cause__ or err.__context__
        if inner is None:
            break
        err = inner
    return err


def describe_not_sent(err: BaseException, settings: PepipostSettings) -> PepipostNotSentError:
    """Why the request could not reach the vendor, in a user's words, and whether trying again can help.

    ``err``: requests' exception (the threaded transport), or the error underneath (the event loop's).
    """
    base = settings.base_url
    root = _innermost(err)
    detail = f"{type(root).__name__}: {str(root)[:EXCERPT_CHARS]}"
    if isinstance(err, requests.exceptions.SSLError) or isinstance(root, ssl.SSLError):
        if isinstance(root, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(err):
            return PepipostNotSentError(
                f"the TLS certificate of {base} could not be verified ({detail}); check the host name, or point "
                "REQUESTS_CA_BUNDLE at your CA bundle",
                retryable=False,
            )
        hint = ""
        if base.startswith("https://"):
            hint = (
                "; if the server speaks plain HTTP, check the scheme of the connection's host "
                f"(http://{base[len('https://') :]})"
            )
        return PepipostNotSentError(f"the TLS handshake with {base} failed ({detail}){hint}", retryable=False)
    if isinstance(err, requests.exceptions.ProxyError):
        return PepipostNotSentError(
            f"the proxy for {base} failed the connection ({detail}); check HTTPS_PROXY / HTTP_PROXY / NO_PROXY"
        )
    if isinstance(root, (NameResolutionError, socket.gaierror)):
        return PepipostNotSentError(f"the host name of {base} could not be resolved ({detail}); check the host")
    if isinstance(err, requests.exceptions.ConnectTimeout) or isinstance(root, (ConnectTimeoutError, ConnectTimedOut)):
        return PepipostNotSentError(f"no connection to {base} within {settings.connect_timeout:g}s ({detail})")
    if isinstance(root, ConnectionRefusedError):
        return PepipostNotSentError(
            f"{base} refused the connection ({detail}); is the service up, and are the host and port right?"
        )
    return PepipostNotSentError(f"could not send to {base} ({detail}); nothing was sent")

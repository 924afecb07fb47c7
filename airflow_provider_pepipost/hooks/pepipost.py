"""PepipostHook: the Airflow connection, one pooled HTTP session, and the send call with its retries."""

from __future__ import annotations

import email.utils
import json
import logging
import time
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import requests
from airflow.sdk import BaseHook
from requests.adapters import HTTPAdapter
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError

from airflow_provider_pepipost.connection_form import (
    CONN_TYPE,
    DEFAULT_BASE_URL,
    DEFAULT_CONN_ID,
    DEFAULT_ENDPOINT,
    EXTRA_FIELDS,
    UI_FIELD_BEHAVIOUR,
)
from airflow_provider_pepipost.errors import (
    FailureKind,
    PepipostApiError,
    PepipostConfigError,
    PepipostOutcomeUnknownError,
)
from airflow_provider_pepipost.messages import MediaMessage, request_body
from airflow_provider_pepipost.status.store import StatusStore

log = logging.getLogger(__name__)

EXCERPT_CHARS = 200
# A Retry-After far beyond our own backoff ceiling is honoured up to this many times the ceiling.
RETRY_AFTER_CEILING_FACTOR = 10


def mask_secret(secret: str) -> None:
    """Hide ``secret`` in every log line of this task (and its supervisor)."""
    try:
        from airflow.sdk.log import mask_secret as airflow_mask_secret
    except ImportError:  # Airflow 3.1
        from airflow.sdk.execution_time.secrets_masker import mask_secret as airflow_mask_secret
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
    status_store_url: str | None

    @property
    def send_url(self) -> str:
        return self.base_url.rstrip("/") + "/" + self.endpoint.lstrip("/")

    def __repr__(self) -> str:  # the dataclass repr would print the key
        return f"PepipostSettings(base_url={self.base_url!r}, source={self.source!r}, endpoint={self.endpoint!r})"


class _NotSentError(Exception):
    """The connection failed before the request went out: safe to try again."""


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
        api_key = (conn.password or "").strip()
        if not api_key:
            raise PepipostConfigError(
                f"connection '{self.pepipost_conn_id}' has no API key: put the Pepipost API key in its password"
            )
        mask_secret(api_key)
        if api_key.lower().startswith("bearer "):
            api_key = api_key[7:].strip()  # the hook adds the prefix itself
            mask_secret(api_key)

        def number(name: str, cast: type) -> Any:
            raw = extra.get(name, EXTRA_FIELDS[name][2])
            try:
                value = cast(raw)
            except (TypeError, ValueError):
                raise PepipostConfigError(
                    f"connection '{self.pepipost_conn_id}': extra '{name}' must be a number, not {raw!r}"
                ) from None
            if value < 0:
                raise PepipostConfigError(f"connection '{self.pepipost_conn_id}': extra '{name}' must be >= 0")
            return value

        return PepipostSettings(
            base_url=self._base_url(conn),
            api_key=api_key,
            source=extra.get("source") or None,
            endpoint=extra.get("endpoint") or DEFAULT_ENDPOINT,
            timeout=number("timeout", float),
            connect_timeout=number("connect_timeout", float),
            max_retries=number("max_retries", int),
            backoff_max=number("backoff_max", float),
            status_store_url=extra.get("status_store_url") or None,
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
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=max(1, self.pool_size), max_retries=0)
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

    @cached_property
    def _send_request(self) -> tuple[requests.PreparedRequest, dict[str, Any]]:
        """The send request prepared once, and the session's proxy/TLS settings merged once.

        Session.post re-merges headers, cookies and environment settings on every call; for a
        campaign that is most of the client's CPU (bench/: 650 us a call, 375 us this way).
        """
        url = self.settings.send_url
        prepared = self.session.prepare_request(requests.Request("POST", url, data=b"{}"))
        return prepared, self.session.merge_environment_settings(url, {}, None, None, None)

    def close(self) -> None:
        """Close the pooled connections; the next send opens new ones."""
        self.__dict__.pop("_send_request", None)
        session = self.__dict__.pop("session", None)
        if session is not None:
            session.close()

    def get_status_store(self, url: str | None = None) -> StatusStore:
        """The delivery-status store named by ``url``, the connection's extra, or the default."""
        return StatusStore(url or self.settings.status_store_url)

    # -- sending --------------------------------------------------------------------------------

    def send_message(self, message: MediaMessage) -> str:
        """Send one media message; return its message id.

        Retries transient failures with exponential backoff and jitter, honouring Retry-After.
        Raises ``PepipostApiError`` when the vendor refuses it, and
        ``PepipostOutcomeUnknownError`` when the request went out but no answer came back.
        """
        return self.post_message_body(request_body(message))

    def post_message_body(self, body: dict[str, Any]) -> str:
        data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        retrying = Retrying(
            stop=stop_after_attempt(self.settings.max_retries + 1),
            wait=self._wait_before_retry,
            retry=retry_if_exception(lambda err: isinstance(err, _NotSentError) or getattr(err, "is_transient", False)),
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            return retrying(self._post_once, data)
        except _NotSentError as err:
            raise PepipostApiError(
                None,
                f"could not connect to {self.settings.base_url} after {self.settings.max_retries + 1} tries: {err}",
                kind=FailureKind.JOB,
            ) from None

    def _post_once(self, data: bytes) -> str:
        settings = self.settings
        template, environment = self._send_request
        request = template.copy()
        request.prepare_body(data, None)
        try:
            response = self.session.send(
                request, timeout=(settings.connect_timeout, settings.timeout), allow_redirects=False, **environment
            )
        except requests.exceptions.ConnectTimeout as err:
            raise _NotSentError(f"connect timeout: {err}") from None
        except requests.exceptions.ReadTimeout:
            raise PepipostOutcomeUnknownError(
                f"no answer within {settings.timeout}s after the request was sent; it may have been accepted"
            ) from None
        except requests.exceptions.ConnectionError as err:
            if _failed_before_sending(err):
                raise _NotSentError(f"connection failed: {_reason(err)}") from None
            raise PepipostOutcomeUnknownError(
                f"connection dropped after the request was sent ({_reason(err)}); it may have been accepted"
            ) from None
        return self._parse_send_response(response)

    def _parse_send_response(self, response: requests.Response) -> str:
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and body.get("status") == "success":
            message_id = (body.get("data") or {}).get("id") if isinstance(body.get("data"), dict) else None
            if isinstance(message_id, str) and message_id:
                return message_id
            raise PepipostOutcomeUnknownError(f"the API said success but gave no data.id: {self._excerpt(response)}")
        if isinstance(body, dict) and body.get("status") == "failure":
            error = body.get("error") if isinstance(body.get("error"), dict) else {}
            code = error.get("code")
            raise PepipostApiError(
                str(code) if code is not None else None,
                self._redact(str(error.get("message") or "no error message").strip()),
                http_status=response.status_code,
                retry_after=retry_after,
            )
        if 200 <= response.status_code < 300:
            # Not the documented shape, yet a 2xx: the vendor may have taken the message.
            raise PepipostOutcomeUnknownError(
                f"unexpected answer (HTTP {response.status_code}): {self._excerpt(response)}"
            )
        raise PepipostApiError(
            None,
            f"unexpected answer: {self._excerpt(response)}",
            http_status=response.status_code,
            retry_after=retry_after,
        )

    def _wait_before_retry(self, retry_state: Any) -> float:
        err = retry_state.outcome.exception() if retry_state.outcome else None
        backoff = wait_exponential_jitter(initial=0.5, max=self.settings.backoff_max)(retry_state)
        retry_after = getattr(err, "retry_after", None)
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.settings.backoff_max * RETRY_AFTER_CEILING_FACTOR)
        return backoff

    def _log_retry(self, retry_state: Any) -> None:
        err = retry_state.outcome.exception() if retry_state.outcome else None
        log.warning(
            "Pepipost send try %d failed (%s); retrying in %.1fs",
            retry_state.attempt_number,
            err,
            retry_state.upcoming_sleep,
        )

    def _excerpt(self, response: requests.Response) -> str:
        text = response.text[:EXCERPT_CHARS]
        return repr(self._redact(text)) + (" ..." if len(response.text) > EXCERPT_CHARS else "")

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
            message_id = self._post_once(data)
        except PepipostApiError as err:
            if err.code in ("8001", "8006"):
                return True, f"Reached {self.settings.base_url}; the API key was accepted"
            if err.kind is FailureKind.JOB:
                return False, f"The API key was refused: {err}"
            return False, str(err)
        except (_NotSentError, PepipostOutcomeUnknownError) as err:
            return False, f"Could not reach {self.settings.base_url}: {err}"
        except Exception as err:
            return False, f"{type(err).__name__}: {self._redact(str(err))}"
        return False, f"The API accepted an empty probe (id {message_id}): is the base URL right?"


def _reason(err: requests.exceptions.ConnectionError) -> str:
    inner = err.args[0] if err.args else err
    reason = getattr(inner, "reason", inner)
    return type(reason).__name__ + (f": {reason}" if str(reason) else "")


def _failed_before_sending(err: requests.exceptions.ConnectionError) -> bool:
    """True when the connection could not be opened, so the vendor never saw the request."""
    inner = err.args[0] if err.args else None
    reason = getattr(inner, "reason", inner)
    return isinstance(reason, (NewConnectionError, ConnectTimeoutError, NameResolutionError))

"""Airflow's REST API as the receiver's service identity: answering a human-in-the-loop task.

The identity is an Airflow connection (default ``pepipost_airflow_api``): host = the api-server's
base URL (``http://airflow-api:8080``), login and password of a user the auth manager lets answer
the DAG's human-in-the-loop tasks (PUT on the DAG's HITL details; with the simple auth manager, a
user with the ``ADMIN`` or ``OP`` role; with FAB, a role holding "can edit on DAG HITL Detail" for
the DAG). The token comes from ``POST {host}/auth/token``, which both auth managers serve.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import httpx

DEFAULT_AIRFLOW_API_CONN_ID = "pepipost_airflow_api"
# Whether a task instance (dag, run, task, map index) seen in a waiting state may be answered now.
Settled = Callable[[tuple[str, str, str, int, int], str], bool]
TIMEOUT = httpx.Timeout(10.0, connect=5.0)


class Outcome(str, Enum):
    """What Airflow said to an answer."""

    ANSWERED = "answered"  # the task resumes with the option
    ALREADY_ANSWERED = "already_answered"  # 409: someone answered first (the first answer wins)
    REFUSED = "refused"  # 400 / 403 / 404: this answer will never be taken; nothing to retry
    CLOSED = "closed"  # the task no longer waits for an answer (it ended, or was cleared)
    NOT_YET = "not_yet"  # the task has not started waiting yet: try again shortly
    UNREACHABLE = "unreachable"  # the network, a 5xx, a token that cannot be had: try again later


# The states of a task that waits for its answer (3.3 parks it; 3.1 and 3.2 defer it), and of one
# that will: an answer that comes before the task waits is held back, as Airflow 3.3.2 can fail a
# task whose answer lands while it is still running.
WAITING_STATES = frozenset({"awaiting_input", "deferred"})
NOT_YET_STATES = frozenset({"scheduled", "queued", "running", "restarting", "up_for_retry", "up_for_reschedule", None})


@dataclass(frozen=True)
class ApiAnswer:
    outcome: Outcome
    detail: str


class AirflowApi:
    """A client of Airflow's REST API, its token fetched once and again when it expires."""

    def __init__(self, base_url: str, login: str | None, password: str | None) -> None:
        self.base_url = base_url.rstrip("/")
        self._login, self._password = login, password
        self._token: str | None = None
        self._lock = threading.Lock()
        self._client = httpx.Client(timeout=TIMEOUT)

    @classmethod
    def from_connection(cls, conn_id: str = DEFAULT_AIRFLOW_API_CONN_ID) -> AirflowApi:
        """The client of the connection ``conn_id``: its host (a URL, or a name with ``port``, and
        ``https`` when the connection type or schema says so), login and password."""
        from airflow.sdk.bases.hook import BaseHook

        conn = BaseHook.get_connection(conn_id)
        return cls(api_base_url(conn_id, conn.host, conn.port, conn.conn_type, conn.schema), conn.login or None,
                   conn.password or None)  # fmt: skip

    def close(self) -> None:
        self._client.close()

    def answer(
        self,
        dag_id: str,
        run_id: str,
        task_id: str,
        map_index: int,
        option: str,
        *,
        try_number: int | None = None,
        settled: Settled | None = None,
    ) -> ApiAnswer:
        """Answer the task with ``option`` once it waits for an answer: ``PATCH .../hitlDetails``
        with ``chosen_options=[option]``. What Airflow said, in a word.

        ``try_number``: the try that asked; another try is not answered (``CLOSED``).
        ``settled(task, state)`` says whether a task seen waiting may be answered now; Airflow 3.3.2
        fails a task resumed before the scheduler took in that it parked (the executor's event for
        the parked try comes after the resume), so the responder answers a task only once it has
        been seen waiting for a while.
        """
        path = (
            f"/api/v2/dags/{quote(dag_id, safe='')}/dagRuns/{quote(run_id, safe='')}/taskInstances/"
            f"{quote(task_id, safe='')}/{map_index}"
        )
        try:
            state_answer = self._send("GET", path, None)
            if state_answer.status_code >= 300:
                return _read(state_answer)
            found = state_answer.json()
            state = found.get("state")
            if try_number is not None and found.get("try_number") not in (None, try_number):
                return ApiAnswer(
                    Outcome.CLOSED, f"try {found.get('try_number')} runs now; the tap answers try {try_number}"
                )
            if state in NOT_YET_STATES:
                return ApiAnswer(Outcome.NOT_YET, f"the task is {state or 'not started'}, not yet waiting")
            if state not in WAITING_STATES:
                return ApiAnswer(Outcome.CLOSED, f"the task is {state}: it no longer waits for an answer")
            if settled is not None and not settled((dag_id, run_id, task_id, map_index, try_number or 0), state):
                return ApiAnswer(Outcome.NOT_YET, f"the task has only just started waiting ({state})")
            return _read(self._send("PATCH", path + "/hitlDetails", {"chosen_options": [option], "params_input": {}}))
        except (httpx.HTTPError, TokenRefused, ValueError) as err:
            return ApiAnswer(Outcome.UNREACHABLE, f"{type(err).__name__}: {err}")

    def _send(self, method: str, path: str, body: dict[str, Any] | None) -> httpx.Response:
        response = self._client.request(method, self.base_url + path, json=body, headers=self._auth())
        if response.status_code == 401 and self._login is not None:  # the token expired: once more, anew
            self._token = None
            response = self._client.request(method, self.base_url + path, json=body, headers=self._auth())
        return response

    def _auth(self) -> dict[str, str]:
        if self._login is None:
            return {}
        with self._lock:
            if self._token is None:
                self._token = self._fetch_token()
            return {"Authorization": f"Bearer {self._token}"}

    def _fetch_token(self) -> str:
        response = self._client.post(
            f"{self.base_url}/auth/token", json={"username": self._login, "password": self._password}
        )
        if response.status_code >= 300:
            raise TokenRefused(f"{self.base_url}/auth/token answered {response.status_code}: check the login")
        token = response.json().get("access_token")
        if not token:
            raise TokenRefused(f"{self.base_url}/auth/token gave no access_token")
        return str(token)


def api_base_url(conn_id: str, host: str | None, port: int | None, conn_type: str | None, schema: str | None) -> str:
    """The api-server's base URL from a connection's fields; ValueError naming the connection."""
    if not host:
        raise ValueError(f"Airflow connection {conn_id!r}: set host to the api-server's URL (http://host:8080)")
    scheme = "https" if "https" in (conn_type, schema) else "http"
    if "://" not in host and host.count(":") > 1 and not host.startswith("["):
        host = f"[{host}]"  # a bare IPv6 address
    parts = urlsplit(host if "://" in host else f"{scheme}://{host}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"Airflow connection {conn_id!r}: host {host!r} is not an http(s) URL")
    name = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    netloc = f"{name}:{parts.port or port}" if (parts.port or port) else name  # never the URL's user:password
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


class TokenRefused(Exception):
    """The api-server gave the service identity no token (wrong login, or no such endpoint)."""


def _read(response: httpx.Response) -> ApiAnswer:
    detail = _detail(response)
    if response.status_code < 300:
        return ApiAnswer(Outcome.ANSWERED, "")
    if response.status_code == 409:
        return ApiAnswer(Outcome.ALREADY_ANSWERED, detail)
    if response.status_code in (401, 403):  # the service identity's permissions: mended, then tried again
        return ApiAnswer(
            Outcome.UNREACHABLE, f"{response.status_code}: {detail} (check the service user's permissions)"
        )
    if response.status_code in (400, 404, 422):
        return ApiAnswer(Outcome.REFUSED, f"{response.status_code}: {detail}")
    return ApiAnswer(Outcome.UNREACHABLE, f"{response.status_code}: {detail}")


def _detail(response: httpx.Response) -> str:
    try:
        found = response.json().get("detail")
    except ValueError:
        found = None
    return str(found if found is not None else response.text)[:300]

"""The receiver's settings, built once into a frozen object: from arguments, the environment, or Airflow's config.

``pepipost-webhook`` passes its command line to its uvicorn worker processes through the
environment (``from_env``); the plugin inside Airflow's API server reads the environment, then
``[pepipost]`` in airflow.cfg (``from_airflow_config``). The app itself reads neither.
"""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from airflow_provider_pepipost.consent import stop_word_set
from airflow_provider_pepipost.status.resolver import STORE_URL_ENV
from airflow_provider_pepipost.webhook.airflow_api import DEFAULT_AIRFLOW_API_CONN_ID

TOKEN_ENV = "PEPIPOST_WEBHOOK_TOKEN"
STOP_WORDS_ENV = "PEPIPOST_STOP_WORDS"
STORE_CONN_ENV = "PEPIPOST_WEBHOOK_STORE_CONN_ID"
ALLOWED_IPS_ENV = "PEPIPOST_WEBHOOK_ALLOWED_IPS"
MAX_BODY_BYTES_ENV = "PEPIPOST_WEBHOOK_MAX_BODY_BYTES"
BODY_TIMEOUT_ENV = "PEPIPOST_WEBHOOK_BODY_TIMEOUT"
MAX_QUEUED_BODIES_ENV = "PEPIPOST_WEBHOOK_MAX_QUEUED_BODIES"
COMMIT_LINGER_ENV = "PEPIPOST_WEBHOOK_COMMIT_LINGER"
AIRFLOW_API_CONN_ENV = "PEPIPOST_AIRFLOW_API_CONN_ID"

DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024
DEFAULT_BODY_TIMEOUT = 10.0  # seconds to receive a whole body once its headers are in
DEFAULT_MAX_QUEUED_BODIES = 1024
# Bytes of request bodies admitted and not yet answered; a parsed body costs about 20x its size.
DEFAULT_MAX_QUEUED_BYTES = 16 * 1024 * 1024
# Seconds a group commit may wait for more bodies when the previous one had company (and never
# longer than that one took); see ``webhook.batching``. Off by default: measured, it paid only with
# many more senders at once than cores, and cost up to a quarter of the throughput with fewer.
DEFAULT_COMMIT_LINGER = 0.0
# Connections a worker of ``pepipost-webhook`` holds beyond its queue bound by default: room for the
# queue's own 503 (``busy``), health checks and scrapes, so that under a stalled store the queue
# bound is what is reached, not uvicorn's cap with its uncounted 503.
CONNECTIONS_BEYOND_QUEUE = 128

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class ReceiverSettings:
    """Everything the receiver app is configured with. See ``webhook.app.create_app`` for each."""

    token: str = ""
    store_url: str | None = None  # None: the store resolver, for ``store_conn_id``
    store_conn_id: str | None = None
    path_prefix: str = "/pepipost"
    allowed_networks: tuple[Network, ...] | None = None  # None: every source
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    max_queued_bodies: int = DEFAULT_MAX_QUEUED_BODIES
    max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES
    commit_linger: float = DEFAULT_COMMIT_LINGER
    refusal_log_interval: float = 60.0
    stop_words: frozenset[str] = field(default_factory=stop_word_set)
    # The Airflow connection (api-server URL, a user allowed to answer) that approval taps answer through.
    airflow_api_conn_id: str = DEFAULT_AIRFLOW_API_CONN_ID

    def __post_init__(self) -> None:
        if problem := seconds_problem(self.body_timeout):
            raise ValueError(f"body_timeout ({BODY_TIMEOUT_ENV}, --body-timeout) {problem}")

    @classmethod
    def from_env(cls) -> ReceiverSettings:
        """What ``pepipost-webhook`` passed to this worker process in the environment."""
        env = os.environ
        return cls(
            token=env.get(TOKEN_ENV, ""),
            store_url=env.get(STORE_URL_ENV) or None,
            store_conn_id=env.get(STORE_CONN_ENV) or None,
            allowed_networks=parse_networks(env.get(ALLOWED_IPS_ENV)),
            max_body_bytes=int(env.get(MAX_BODY_BYTES_ENV) or DEFAULT_MAX_BODY_BYTES),
            body_timeout=float(env.get(BODY_TIMEOUT_ENV) or DEFAULT_BODY_TIMEOUT),
            max_queued_bodies=int(env.get(MAX_QUEUED_BODIES_ENV) or DEFAULT_MAX_QUEUED_BODIES),
            commit_linger=float(env.get(COMMIT_LINGER_ENV) or DEFAULT_COMMIT_LINGER),
            stop_words=stop_words_or_env(None),
            airflow_api_conn_id=env.get(AIRFLOW_API_CONN_ENV) or DEFAULT_AIRFLOW_API_CONN_ID,
        )

    @classmethod
    def from_airflow_config(cls) -> ReceiverSettings:
        """The plugin's settings: each from the environment, else ``[pepipost]`` in airflow.cfg. The
        store is the store resolver's answer, as for every other part."""
        return cls(
            token=_airflow_setting(TOKEN_ENV, "webhook_token") or "",
            path_prefix="",  # mounted under /pepipost by the plugin
            allowed_networks=parse_networks(_airflow_setting(ALLOWED_IPS_ENV, "webhook_allowed_ips")),
            stop_words=stop_word_set(_airflow_setting(STOP_WORDS_ENV, "stop_words")),
            airflow_api_conn_id=_airflow_setting(AIRFLOW_API_CONN_ENV, "airflow_api_conn_id")
            or DEFAULT_AIRFLOW_API_CONN_ID,
        )


def seconds_problem(value: float) -> str | None:
    """Why ``value`` is no time limit (not above 0, infinite, or not a number at all), or None when it is one."""
    if not 0 < value < math.inf:  # also NaN, which compares false with everything: a deadline never reached
        return f"must be a finite number of seconds above 0, not {value!r}"
    return None


def stop_words_or_env(stop_words: str | Sequence[str] | None) -> frozenset[str]:
    """The stop words given (a list, or one comma-separated string), else ``$PEPIPOST_STOP_WORDS``,
    else STOP, UNSUBSCRIBE, STOP ALL."""
    return stop_word_set(stop_words if stop_words is not None else os.environ.get(STOP_WORDS_ENV) or None)


def parse_networks(allowed_ips: Sequence[str] | str | None) -> tuple[Network, ...] | None:
    """Addresses or networks (``10.0.0.0/8``), as a list or one comma-separated string.

    None (or an empty string) allows every source; a list that names none allows none.
    """
    if not allowed_ips:
        return None
    if isinstance(allowed_ips, str):
        allowed_ips = allowed_ips.split(",")
    return tuple(ipaddress.ip_network(item.strip(), strict=False) for item in allowed_ips if item.strip())


def _airflow_setting(env: str, key: str) -> str | None:
    if value := os.environ.get(env):
        return value
    try:
        from airflow.configuration import conf

        return conf.get("pepipost", key, fallback=None)
    except Exception:  # no Airflow config in this process: nothing set there
        return None

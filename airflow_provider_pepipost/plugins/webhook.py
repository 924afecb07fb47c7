"""Mounts the delivery-report receiver in Airflow 3's API server, at ``/pepipost/webhook``.

Airflow's auth does not cover plugin endpoints: the receiver checks its own token
(``$PEPIPOST_WEBHOOK_TOKEN`` or ``[pepipost] webhook_token``) and refuses every report without one.
Its store is the store resolver's answer, as for every other part. The API server's own uvicorn
serves it: leave ``airflow api-server --proxy-headers`` off unless a proxy you run sits in front,
or ``webhook_allowed_ips`` can be passed with a forged X-Forwarded-For.
"""

from __future__ import annotations

import os

from airflow.plugins_manager import AirflowPlugin

from airflow_provider_pepipost.webhook.app import STOP_WORDS_ENV, TOKEN_ENV, create_app


def _setting(env: str, key: str) -> str | None:
    if value := os.environ.get(env):
        return value
    try:
        from airflow.configuration import conf

        return conf.get("pepipost", key, fallback=None)
    except Exception:  # no Airflow config in this process: nothing set there
        return None


def build_receiver_app():  # -> FastAPI
    allowed = _setting("PEPIPOST_WEBHOOK_ALLOWED_IPS", "webhook_allowed_ips")
    return create_app(
        store_url=None,  # the store resolver: [pepipost] status_store_conn_id, env, status_store_url, SQLite
        token=_setting(TOKEN_ENV, "webhook_token") or "",
        path_prefix="",
        allowed_ips=allowed.split(",") if allowed else None,
        stop_words=_setting(STOP_WORDS_ENV, "stop_words"),
    )


class PepipostWebhookPlugin(AirflowPlugin):
    name = "pepipost_webhook"
    fastapi_apps = [
        {"app": build_receiver_app(), "url_prefix": "/pepipost", "name": "Pepipost delivery-report receiver"}
    ]

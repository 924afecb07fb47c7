"""Mounts the delivery-report receiver in Airflow 3's API server, at ``/pepipost/webhook``.

Airflow's auth does not cover plugin endpoints: the receiver checks its own token
(``$PEPIPOST_WEBHOOK_TOKEN`` or ``[pepipost] webhook_token``) and refuses every report without one.
Its store is the store resolver's answer, as for every other part. The API server's own uvicorn
serves it: leave ``airflow api-server --proxy-headers`` off unless a proxy you run sits in front,
or ``webhook_allowed_ips`` can be passed with a forged X-Forwarded-For.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin
from fastapi import FastAPI

from airflow_provider_pepipost.webhook.app import build_app
from airflow_provider_pepipost.webhook.settings import ReceiverSettings


def build_receiver_app() -> FastAPI:
    """The receiver as the API server mounts it: settings from the environment, else airflow.cfg."""
    return build_app(ReceiverSettings.from_airflow_config())


class PepipostWebhookPlugin(AirflowPlugin):
    name = "pepipost_webhook"
    fastapi_apps = [
        {"app": build_receiver_app(), "url_prefix": "/pepipost", "name": "Pepipost delivery-report receiver"}
    ]

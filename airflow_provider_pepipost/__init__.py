"""airflow-provider-pepipost: WhatsApp media campaigns through Pepipost, from Airflow DAGs."""

from __future__ import annotations

from typing import Any

from airflow_provider_pepipost.version_compat import AIRFLOW_VERSION  # noqa: F401 - fails on an Airflow not supported

__version__ = "0.1.0"


def get_provider_info() -> dict[str, Any]:
    """Provider metadata that Airflow reads through the ``apache_airflow_provider`` entry point."""
    from airflow_provider_pepipost.connection_form import (
        CONN_TYPE,
        provider_conn_fields,
        provider_ui_field_behaviour,
    )

    integration = "Pepipost WhatsApp"
    return {
        "package-name": "airflow-provider-pepipost",
        "name": "Pepipost WhatsApp",
        "description": (
            "Send WhatsApp media and template messages through Pepipost, manage consent, and wait for "
            "their delivery reports."
        ),
        "versions": [__version__],
        "integrations": [
            {"integration-name": integration, "external-doc-url": "https://pepipost.com/", "tags": ["service"]}
        ],
        "connection-types": [
            {
                "connection-type": CONN_TYPE,
                "hook-class-name": "airflow_provider_pepipost.hooks.pepipost.PepipostHook",
                "hook-name": "Pepipost",
                "conn-fields": provider_conn_fields(),
                "ui-field-behaviour": provider_ui_field_behaviour(),
            }
        ],
        "hooks": [{"integration-name": integration, "python-modules": ["airflow_provider_pepipost.hooks.pepipost"]}],
        "operators": [
            {
                "integration-name": integration,
                "python-modules": [
                    "airflow_provider_pepipost.operators.whatsapp",
                    "airflow_provider_pepipost.operators.consent",
                    "airflow_provider_pepipost.operators.maintenance",
                    "airflow_provider_pepipost.operators.replies",
                ],
            }
        ],
        "sensors": [
            {"integration-name": integration, "python-modules": ["airflow_provider_pepipost.sensors.whatsapp"]}
        ],
        "triggers": [
            {
                "integration-name": integration,
                "python-modules": [
                    "airflow_provider_pepipost.triggers.status",
                    "airflow_provider_pepipost.triggers.replies",
                ],
            }
        ],
        "extra-links": ["airflow_provider_pepipost.operators.links.WhatsAppCampaignLink"],
        "notifications": [
            "airflow_provider_pepipost.notifications.whatsapp.WhatsAppTemplateNotifier",
            "airflow_provider_pepipost.notifications.whatsapp.WhatsAppHITLNotifier",
        ],
        "config": {"pepipost": _config_section()},
        "plugins": [
            {
                "name": "pepipost_webhook",
                "plugin-class": "airflow_provider_pepipost.plugins.webhook.PepipostWebhookPlugin",
            },
            {
                "name": "pepipost_campaign_page",
                "plugin-class": "airflow_provider_pepipost.plugins.campaign_page.PepipostCampaignPagePlugin",
            },
        ],
    }


def _option(description: str, *, sensitive: bool = False, example: str | None = None) -> dict[str, Any]:
    option: dict[str, Any] = {
        "description": description,
        "version_added": None,
        "type": "string",
        "example": example,
        "default": None,
    }
    if sensitive:  # hidden by Airflow's config views, and readable from _CMD and _SECRET variants
        option["sensitive"] = True
    return option


def _config_section() -> dict[str, Any]:
    """``[pepipost]`` in airflow.cfg (or ``AIRFLOW__PEPIPOST__*``): what the provider reads there."""
    return {
        "description": "The Pepipost WhatsApp provider: its status store, webhook receiver and erasure key.",
        "options": {
            "status_store_conn_id": _option(
                "Airflow connection (postgres or sqlite) of the status store every part uses.", example="pepipost_store"
            ),
            "status_store_url": _option(
                "SQLAlchemy URL of the status store, when no connection is named; prefer status_store_conn_id.",
                sensitive=True,
            ),
            "airflow_api_conn_id": _option(
                "Airflow connection (the api-server's URL, a user allowed to answer human-in-the-loop tasks) "
                "through which the plugin's receiver answers approvals tapped on WhatsApp.",
                example="pepipost_airflow_api",
            ),
            "webhook_token": _option(
                "The shared token every delivery report posted to the plugin's receiver must carry.", sensitive=True
            ),
            "webhook_allowed_ips": _option(
                "Comma-separated source addresses or networks the plugin's receiver takes reports from.",
                example="203.0.113.0/24",
            ),
            "send_transport": _option(
                "How a send task makes its requests: event_loop (the default: one event loop thread carries every "
                "send in flight) or threads (max_workers threads). A send URL that HTTPS_PROXY / HTTP_PROXY applies "
                "to always goes through threads.",
                example="threads",
            ),
            "stop_words": _option("Comma-separated replies that opt their sender out.", example="STOP,UNSUBSCRIBE"),
            "erasure_key": _option(
                "The key erased numbers are kept under on the suppression list (pepipost-store erase). Set it "
                "for every component, and never change it: the store refuses to send or erase with another.",
                sensitive=True,
            ),
        },
    }

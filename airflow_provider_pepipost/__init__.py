"""airflow-provider-pepipost: WhatsApp media campaigns through Pepipost, from Airflow DAGs."""

from __future__ import annotations

from typing import Any

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
                ],
            }
        ],
        "sensors": [
            {"integration-name": integration, "python-modules": ["airflow_provider_pepipost.sensors.whatsapp"]}
        ],
        "triggers": [
            {"integration-name": integration, "python-modules": ["airflow_provider_pepipost.triggers.status"]}
        ],
        "extra-links": ["airflow_provider_pepipost.operators.links.WhatsAppCampaignLink"],
        "notifications": ["airflow_provider_pepipost.notifications.whatsapp.WhatsAppTemplateNotifier"],
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

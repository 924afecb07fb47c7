"""WhatsAppTemplateNotifier through a real DAG run: the task fails and its callback reaches the sandbox."""

from __future__ import annotations

import pytest

from airflow_provider_pepipost.errors import PepipostError
from airflow_provider_pepipost.notifications.whatsapp import WhatsAppTemplateNotifier
from airflow_provider_pepipost.sandbox import SandboxServer, Scenario
from tests.helpers import run_dag

pytestmark = pytest.mark.dag


def test_a_failed_task_sends_the_alert_template_with_the_rendered_attributes(airflow_db, pepipost_conn):
    with SandboxServer(Scenario()) as vendor:
        pepipost_conn(vendor.url)
        result = run_dag("pepipost_test_notifier")
        assert result.state == "failed" and result.task_state("load_orders") == "failed"
        bodies = [entry["body"]["message"][0] for entry in vendor.state.accepted]
    assert sorted(b["recipient_whatsapp"] for b in bodies) == ["919800000001", "919800000002"]
    template = bodies[0]["type_template"][0]
    assert template["name"] == "airflow_task_alert" and template["language"] == {"locale": "en"}
    task_id, dag_id, run_id, try_number, log_url = template["attributes"]
    assert (task_id, dag_id, try_number) == ("load_orders", "pepipost_test_notifier", "1")
    assert run_id.startswith("manual__") and "pepipost_test_notifier" in log_url and "load_orders" in log_url
    assert bodies[0]["message_type"] == "template" and "type_media_template" not in bodies[0]


def test_a_failure_to_notify_is_logged_loudly_and_can_be_made_to_raise(pepipost_conn, capfd):
    with SandboxServer(Scenario()) as vendor:
        pepipost_conn(vendor.url)
        context = {"ti": None, "run_id": "r1"}
        quiet = WhatsAppTemplateNotifier(recipients="919800000001", template_name="no_such_template", attributes=["x"])
        quiet.notify(context)  # logged, not raised
        logged = "".join(capfd.readouterr())
        assert "WhatsApp alert 'no_such_template' was NOT sent" in logged and "9198******01" in logged
        assert "error" in logged.lower() and "919800000001" not in logged
        loud = WhatsAppTemplateNotifier(
            recipients="919800000001", template_name="no_such_template", attributes=["x"], raise_on_failure=True
        )
        with pytest.raises(PepipostError, match="8006"):
            loud.notify(context)
        assert vendor.state.accepted_count == 0


def test_the_async_path_sends_the_same_message(pepipost_conn):
    import asyncio

    with SandboxServer(Scenario()) as vendor:
        pepipost_conn(vendor.url)
        notifier = WhatsAppTemplateNotifier(
            recipients=["919800000003"], template_name="spring_offer", attributes=["{{ params.who }}"]
        )
        notifier.context = {"params": {"who": "Asha {on call}"}}
        asyncio.run(_awaited(notifier))
        sent = vendor.state.accepted[0]["body"]["message"][0]
    assert sent["type_template"][0]["attributes"] == ["Asha {on call}"]  # braces in a value stay text


async def _awaited(notifier: WhatsAppTemplateNotifier) -> None:
    await notifier

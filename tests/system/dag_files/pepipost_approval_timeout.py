"""The approval example's shape with a 20-second answer window, for the system test of a timeout:
nobody answers, the operator takes its default ("Reject") and the campaign is skipped."""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import dag

from airflow_provider_pepipost.notifications.whatsapp import WhatsAppHITLNotifier
from airflow_provider_pepipost.operators.whatsapp import SendWhatsAppTemplateOperator


@dag(schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False)
def pepipost_approval_timeout():
    approval = ApprovalOperator(
        task_id="approve_campaign",
        subject="Send it?",
        body="A test of the answer window.",
        defaults="Reject",
        response_timeout=timedelta(seconds=20),
        notifiers=[WhatsAppHITLNotifier(recipients="+91 99000 00001", template_name="airflow_approval_request")],
    )
    send = SendWhatsAppTemplateOperator(
        task_id="send_campaign",
        recipients=["+91 95000 00001"],
        template_name="spring_offer",
        language="en",
        attributes=["friend"],
    )
    approval >> send


pepipost_approval_timeout()

"""Example: tonight's campaign waits for a marketing lead's approval, given from the phone.

`ApprovalOperator` (Airflow's human-in-the-loop) asks for a decision; `WhatsAppHITLNotifier` sends
the question to the approver's WhatsApp as the approved template `airflow_approval_request`, with
one quick-reply button per option ("Approve", "Reject"). The tap comes back to the webhook
receiver, which checks that it is the approver's, and answers the task through Airflow's REST API
with the service identity of the connection `pepipost_airflow_api` (see docs/approvals.md, "Approvals on
WhatsApp"), and tells the approver it was recorded. Approved: the campaign is sent. Rejected, or
no answer within the hour (the operator's default, "Reject"): the campaign is skipped. The
approvers are the Variable `campaign_approvers`. Runs as-is against the local sandbox, whose
scenario approves the request and confirmation templates.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import dag, task

from airflow_provider_pepipost.notifications.whatsapp import WhatsAppHITLNotifier
from airflow_provider_pepipost.operators.whatsapp import SendWhatsAppTemplateOperator


@dag(
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["pepipost", "whatsapp", "example", "approvals"],
    params={"audience_size": 20},
)
def whatsapp_campaign_approval():
    @task(show_return_value_in_logs=False)  # phone numbers stay out of the task log
    def build_audience(params=None) -> list[dict]:
        """In production: tonight's segment from your CRM."""
        return [
            {"recipient_whatsapp": f"+91 95{index:08d}", "name": f"Customer {index}"}
            for index in range(int(params["audience_size"]))
        ]

    audience = build_audience()
    # [START howto_notifier_whatsapp_hitl]
    approval = ApprovalOperator(
        task_id="approve_campaign",
        subject="Send tonight's spring offer?",
        body="{{ ti.xcom_pull('build_audience') | length }} customers are in tonight's segment.",
        defaults="Reject",  # no answer in time: the campaign is skipped
        response_timeout=timedelta(minutes=60),
        notifiers=[
            WhatsAppHITLNotifier(
                # The approvers come from a Variable, not from params: whoever triggers the DAG (and
                # may change its params) must not be able to name themselves.
                recipients="{{ var.value.get('campaign_approvers', '+91 99000 00001') }}",
                template_name="airflow_approval_request",
                confirmation_template="airflow_approval_recorded",  # "Your answer {{1}} was recorded."
            )
        ],
    )
    # [END howto_notifier_whatsapp_hitl]
    send = SendWhatsAppTemplateOperator(
        task_id="send_campaign",
        recipients=audience,
        template_name="spring_offer",
        language="en",
        attributes=["{name}"],
        retries=2,
    )
    audience >> approval >> send


whatsapp_campaign_approval()

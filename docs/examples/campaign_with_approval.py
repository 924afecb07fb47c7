from datetime import timedelta

from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import dag

from airflow_provider_pepipost.notifications.whatsapp import WhatsAppHITLNotifier
from airflow_provider_pepipost.operators.whatsapp import SendWhatsAppTemplateOperator


@dag(schedule=None)
def campaign_with_approval():
    approval = ApprovalOperator(
        task_id="approve_campaign",
        subject="Send tonight's spring offer?",
        defaults="Reject",  # no answer within the hour: skipped
        response_timeout=timedelta(hours=1),
        notifiers=[WhatsAppHITLNotifier(recipients=["+91 99000 00001"], template_name="airflow_approval_request")],
    )
    send = SendWhatsAppTemplateOperator(
        task_id="send_campaign",
        recipients=["+91 98330 78369"],
        template_name="spring_offer",
        language="en",
        attributes=["friend"],
    )
    approval >> send


campaign_with_approval()

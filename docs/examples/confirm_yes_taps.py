from airflow.sdk import Asset, AssetWatcher, dag

from airflow_provider_pepipost.operators.replies import ClaimWhatsAppRepliesOperator
from airflow_provider_pepipost.operators.whatsapp import SendWhatsAppTemplateOperator
from airflow_provider_pepipost.triggers.replies import WhatsAppReplyTrigger

YES_TAPS = Asset(
    "pepipost://replies/whatsapp_offer_with_buttons/yes",
    watchers=[
        AssetWatcher(
            name="yes_taps",
            trigger=WhatsAppReplyTrigger(button_payloads=["YES_BOOK"], dag_id="whatsapp_offer_with_buttons"),
        )
    ],
)


@dag(schedule=[YES_TAPS])
def confirm_yes_taps():
    # Claims the run's taps in the status store (each tap goes to one run only) and sweeps up
    # matching taps no run has claimed; XCom gets [{"inbound_id": ...}], never a number.
    taps = ClaimWhatsAppRepliesOperator(task_id="claim_taps", asset=YES_TAPS)
    SendWhatsAppTemplateOperator(task_id="confirm", recipients=taps.output, template_name="slot_booked", language="en")


confirm_yes_taps()

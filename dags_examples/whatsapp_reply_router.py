"""Example: every "Yes, book it" tap on the offer of `whatsapp_offer_with_buttons` gets a booking
confirmation, once, as the taps come in.

The DAG is scheduled on an asset watched by `WhatsAppReplyTrigger` in Airflow's triggerer: each new
tap on the `YES_BOOK` button of a message that DAG sent is an asset event, whose small payload
holds the tap's `inbound_id` (and a masked number, never the whole one). Airflow may put several
taps in one run, may deliver a tap again after a triggerer restart, and (Airflow 3.3.2,
apache/airflow#56050) may leave taps that came while a run was being made to a later run.
`ClaimWhatsAppRepliesOperator` claims the run's taps in the status store, and sweeps up matching
taps no run has claimed: each tap is handled by exactly one run. The half-hourly run (and any run
triggered by hand) only sweeps. The confirmation goes to rows that name the tap (`inbound_id`):
the send operator reads the number from the store, so no whole number passes through XCom.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Asset, AssetWatcher, dag
from airflow.timetables.assets import AssetOrTimeSchedule
from airflow.timetables.trigger import CronTriggerTimetable

from airflow_provider_pepipost.operators.replies import ClaimWhatsAppRepliesOperator
from airflow_provider_pepipost.operators.whatsapp import SendWhatsAppTemplateOperator
from airflow_provider_pepipost.triggers.replies import WhatsAppReplyTrigger

# [START howto_trigger_whatsapp_reply]
YES_TAPS = Asset(
    "pepipost://replies/whatsapp_offer_with_buttons/yes",
    watchers=[
        AssetWatcher(
            name="slot_offer_yes_taps",
            trigger=WhatsAppReplyTrigger(
                button_payloads=["YES_BOOK"], dag_id="whatsapp_offer_with_buttons", poll_interval=2.0
            ),
        )
    ],
)


@dag(
    # On every tap; and every half hour, for taps whose event Airflow left to a later run.
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("*/30 * * * *", timezone="UTC"), assets=YES_TAPS),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["pepipost", "whatsapp", "example", "replies"],
)
def whatsapp_reply_router():
    taps = ClaimWhatsAppRepliesOperator(task_id="claim_taps", asset=YES_TAPS)

    SendWhatsAppTemplateOperator(
        task_id="send_booking_confirmation",
        recipients=taps.output,  # [{"inbound_id": ...}]: each goes to the number that tapped
        template_name="slot_booked",
        language="en",
        retries=2,
    )
    # [END howto_trigger_whatsapp_reply]


whatsapp_reply_router()

import pendulum
from airflow.sdk import dag

from airflow_provider_pepipost.operators.consent import WhatsAppConsentOperator


@dag(schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False)
def signups_opt_in():
    WhatsAppConsentOperator(
        task_id="opt_in_signups",
        recipients="/data/signups.csv",  # as for sending: list, XCom, CSV / JSON Lines path
        kind="optin",  # or "optout"
        source="WEB_SIGNUP",  # where the consent came from (required, at most 25 characters)
        batch_size=100,  # recipients per call; the vendor documents no limit for this API
        sync_reply_opt_outs=True,  # pass STOP replies on to the vendor as opt-outs
    )


signups_opt_in()

"""Example: opt in the people who signed up, send them the campaign, and honour their STOP.

Pepipost answers 8002 to a number without a WhatsApp opt-in. This DAG records the opt-ins from a
sign-up file through the vendor's consent API (`WhatsAppConsentOperator`), then sends the approved
template `spring_offer` to the same file. Replies that say STOP (or UNSUBSCRIBE, STOP ALL) reach
the webhook receiver, which puts the sender on the status store's suppression list: the next run
neither opts them in again nor messages them, and its opt-in task passes their opt-out on to the
vendor (`sync_reply_opt_outs`).

Against the local sandbox, the last task makes the first subscriber reply STOP, so that a second
run shows the skip. It does nothing against any other host.
"""

from __future__ import annotations

from pathlib import Path

import pendulum
from airflow.sdk import XComArg, dag, task

from airflow_provider_pepipost.operators.consent import WhatsAppConsentOperator
from airflow_provider_pepipost.operators.whatsapp import SendWhatsAppTemplateOperator
from airflow_provider_pepipost.sensors.whatsapp import WhatsAppMessageStatusSensor

SIGNUPS = str(Path(__file__).parent / "data" / "signups.csv")


@dag(
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["pepipost", "whatsapp", "example", "consent"],
    params={"signups_file": SIGNUPS, "simulate_stop_reply": True},
)
def whatsapp_opt_in_then_campaign():
    # [START howto_operator_whatsapp_consent]
    opt_in = WhatsAppConsentOperator(
        task_id="opt_in_signups",
        recipients="{{ params.signups_file }}",  # CSV: recipient_whatsapp, name, consent_source, ip
        kind="optin",
        source="WEB_SIGNUP",  # for rows without a consent_source
        sync_reply_opt_outs=True,  # STOP replies received since the last run go to the vendor too
        retries=2,
    )

    send = SendWhatsAppTemplateOperator(
        task_id="send_offer",
        recipients="{{ params.signups_file }}",
        template_name="spring_offer",
        attributes=["{name}"],
        max_rejected_ratio=0.1,
        retries=2,
    )  # respect_opt_outs=True (the default): numbers that said STOP are skipped, state 'suppressed'
    # [END howto_operator_whatsapp_consent]

    wait = WhatsAppMessageStatusSensor(
        task_id="wait_for_delivery",
        message_ids=send.output,
        target_status="delivered",
        min_success_ratio=0.75,
        deferrable=True,
        poke_interval=15,  # under ~15 s a busy scheduler can trip apache/airflow#66374 (docs/guarantees.md, "Limits")
        timeout=15 * 60,
    )

    @task
    def report(consent: dict, summary: dict) -> dict:
        print(
            f"Opted in: {consent['confirmed']} (not again, having said STOP: {consent['skipped_opted_out']}); "
            f"reply opt-outs passed on to the vendor: {consent['reply_opt_outs_synced']}. Sent: "
            f"{summary['accepted']}; skipped as opted out: {summary['suppressed']}; rejected: {summary['rejected']}"
        )
        return {"opted_in": consent["confirmed"], "sent": summary["accepted"], "suppressed": summary["suppressed"]}

    @task
    def simulate_stop_reply(params=None) -> bool:
        """Sandbox only: the first subscriber replies STOP, as a person would on their phone."""
        import csv
        from urllib.parse import urlsplit

        import requests

        from airflow_provider_pepipost.hooks.pepipost import PepipostHook
        from airflow_provider_pepipost.messages import normalize_phone

        base = PepipostHook().settings.base_url
        if not params["simulate_stop_reply"] or urlsplit(base).hostname not in ("127.0.0.1", "localhost"):
            print("Not the local sandbox: no reply is simulated")
            return False
        with open(params["signups_file"], newline="") as signups:
            first = normalize_phone(next(csv.DictReader(signups))["recipient_whatsapp"])
        answer = requests.post(f"{base.rstrip('/')}/_sandbox/reply", json={"from": first, "text": "STOP"}, timeout=10)
        answer.raise_for_status()
        print(f"The sandbox's subscriber {first[:4]}******{first[-2:]} replied STOP")
        return True

    opt_in >> send
    report(opt_in.output, XComArg(send, key="send_summary")) << wait
    wait >> simulate_stop_reply()


whatsapp_opt_in_then_campaign()

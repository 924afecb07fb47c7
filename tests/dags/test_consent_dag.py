"""The opt-in example end to end: 8002 before the opt-in, none after; a STOP reply through the
real receiver; the next run neither opts that number in again nor messages it."""

from __future__ import annotations

import csv

import pytest

from airflow_provider_pepipost.messages import normalize_phone
from airflow_provider_pepipost.operators.whatsapp import SendWhatsAppTemplateOperator
from airflow_provider_pepipost.sandbox import SandboxServer, Scenario
from airflow_provider_pepipost.status.store import StatusStore
from tests.conftest import WEBHOOK_TOKEN
from tests.dags.test_examples import REPO
from tests.helpers import StandInTaskInstance, run_dag, run_operator, wait_until

pytestmark = pytest.mark.dag
SIGNUPS = REPO / "dags_examples" / "data" / "signups.csv"


def test_opt_in_then_campaign_then_stop(airflow_db, sqlite_receiver, pepipost_conn):
    with open(SIGNUPS, newline="") as rows:
        numbers = [normalize_phone(row["recipient_whatsapp"]) for row in csv.DictReader(rows)]
    scenario = Scenario(optin_required_ratio=1.0, final_mix={"read": 0.9, "delivered": 0.1}, status_delay=0.05)
    headers = {"X-Pepipost-Token": WEBHOOK_TOKEN}
    with SandboxServer(scenario, webhook_url=sqlite_receiver.webhook_url, webhook_headers=headers) as vendor:
        pepipost_conn(vendor.url, sqlite_receiver.store_url)

        # Before any opt-in, every row meets 8002.
        _, ti = run_operator(str(SIGNUPS), StandInTaskInstance(dag_id="before"), SendWhatsAppTemplateOperator,
                             template_name="spring_offer", attributes=["{name}"], max_rejected_ratio=1.0)  # fmt: skip
        assert ti.xcom["send_summary"]["error_codes"] == {"8002": len(numbers)} and vendor.state.accepted_count == 0

        first = run_dag("whatsapp_opt_in_then_campaign")
        assert first.state == "success", first.tasks
        assert first.value("report") == {"opted_in": 20, "sent": 20, "suppressed": 0}
        assert "8002" not in first.value("send_offer", "send_summary")["error_codes"]
        assert set(vendor.state.opted_in) == set(numbers)
        assert first.value("simulate_stop_reply") is True

        # The STOP reply went through the real receiver into the suppression list.
        store = StatusStore(sqlite_receiver.store_url)
        assert wait_until(lambda: store.suppressed(numbers) == {numbers[0]}, timeout=20)
        sent_before = dict(vendor.state.accepted_by_recipient)

        second = run_dag("whatsapp_opt_in_then_campaign", simulate_stop_reply=False)
        assert second.state == "success", second.tasks
        consent = second.value("opt_in_signups")
        assert (consent["confirmed"], consent["skipped_opted_out"], consent["reply_opt_outs_synced"]) == (19, 1, 1)
        assert second.value("report") == {"opted_in": 19, "sent": 19, "suppressed": 1}
        assert vendor.state.accepted_by_recipient[numbers[0]] == sent_before[numbers[0]] == 1  # nothing more
        assert all(vendor.state.accepted_by_recipient[n] == 2 for n in numbers[1:])
        assert numbers[0] in vendor.state.opted_out  # the reply's opt-out reached the vendor
        assert store.reply_opt_outs() == []

"""The send task's extra link: the task instance's campaign tab inside the UI, mapped or not."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from airflow_provider_pepipost.operators.links import TASK_VIEW_ROUTE, WhatsAppCampaignLink
from airflow_provider_pepipost.plugins.campaign_page import PepipostCampaignPagePlugin

RUN = "/dags/d%201/runs/manual__2026-01-01T00%3A00%3A00%2B00%3A00"


@pytest.mark.parametrize(
    ("map_index", "path"),
    [(-1, "/tasks/send/plugin/pepipost_campaign_task"), (2, "/tasks/send/mapped/2/plugin/pepipost_campaign_task")],
)
def test_the_link_opens_the_task_instances_campaign_tab(monkeypatch, map_index, path):
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "https://airflow.example.com/")
    key = SimpleNamespace(dag_id="d 1", run_id="manual__2026-01-01T00:00:00+00:00", task_id="send", map_index=map_index)
    assert WhatsAppCampaignLink().get_link(None, ti_key=key) == "https://airflow.example.com" + RUN + path


def test_the_tab_it_opens_is_one_the_plugin_registers_for_task_instances():
    (view,) = [v for v in PepipostCampaignPagePlugin.external_views if v["destination"] == "task_instance"]
    assert view["url_route"] == TASK_VIEW_ROUTE

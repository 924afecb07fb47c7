"""The send task's extra link to its campaign page in the Airflow UI."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from airflow.sdk import BaseOperatorLink

PAGE_PREFIX = "/pepipost-campaigns"
# The plugin's external views (its "WhatsApp campaign" tabs): the UI shows them at
# <run or task instance page>/plugin/<url_route>, the page in a frame under Airflow's own header.
RUN_VIEW_ROUTE = "pepipost_campaign_run"
TASK_VIEW_ROUTE = "pepipost_campaign_task"


def campaign_page_path(dag_id: str, run_id: str, task_id: str | None = None) -> str:
    """The page of a DAG run's campaign, or of one send task of it, under the API server."""
    path = f"{PAGE_PREFIX}/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}"
    return path + (f"/tasks/{quote(task_id, safe='')}" if task_id else "")


def campaign_tab_path(dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> str:
    """The task instance's "WhatsApp campaign" tab in the UI: the page inside the UI, not instead of it."""
    path = f"/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}/tasks/{quote(task_id, safe='')}"
    if map_index is not None and map_index >= 0:
        path += f"/mapped/{map_index}"
    return f"{path}/plugin/{TASK_VIEW_ROUTE}"


class WhatsAppCampaignLink(BaseOperatorLink):
    """ "WhatsApp campaign" on a send task: its funnel, latencies, failures and CSV export.

    Airflow's UI opens a link to its own origin in the same tab, so the link goes to the task
    instance's campaign tab (the plugin's external view), where the UI's header and navigation stay.
    """

    name = "WhatsApp campaign"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        try:
            from airflow.configuration import conf

            base = (conf.get("api", "base_url", fallback="") or "").rstrip("/")
        except Exception:  # no Airflow config here: a path the UI resolves against its own host
            base = ""
        map_index = getattr(ti_key, "map_index", -1)
        return base + campaign_tab_path(ti_key.dag_id, ti_key.run_id, ti_key.task_id, map_index)

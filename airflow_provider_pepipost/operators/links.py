"""The send task's extra link to its campaign page in the Airflow UI."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from airflow.sdk import BaseOperatorLink

PAGE_PREFIX = "/pepipost-campaigns"


def campaign_page_path(dag_id: str, run_id: str, task_id: str | None = None) -> str:
    """The page of a DAG run's campaign, or of one send task of it, under the API server."""
    path = f"{PAGE_PREFIX}/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}"
    return path + (f"/tasks/{quote(task_id, safe='')}" if task_id else "")


class WhatsAppCampaignLink(BaseOperatorLink):
    """ "WhatsApp campaign" on a send task: its funnel, latencies, failures and CSV export."""

    name = "WhatsApp campaign"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        try:
            from airflow.configuration import conf

            base = (conf.get("api", "base_url", fallback="") or "").rstrip("/")
        except Exception:  # no Airflow config here: a path the UI resolves against its own host
            base = ""
        return base + campaign_page_path(ti_key.dag_id, ti_key.run_id, ti_key.task_id)

"""The campaign page in Airflow's UI: ``/pepipost-campaigns/dags/{dag_id}/runs/{run_id}[/tasks/{task_id}]``.

Served by the API server (the provider's plugin mounts it). Plugin endpoints are not covered by
Airflow's auth on their own: every route here asks Airflow's auth manager, as the core API does,
for the signed-in user (the UI's session cookie or a Bearer token) and for read access to the
DAG's runs; without it the answer is 401 or 403 and names nothing of the DAG. Numbers are masked
in the page; the CSV holds them whole only for users who may also edit the DAG.
"""

from __future__ import annotations

import csv
import inspect
import io
from collections.abc import Callable, Iterator
from typing import Any

from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from airflow_provider_pepipost.operators.links import PAGE_PREFIX, RUN_VIEW_ROUTE, TASK_VIEW_ROUTE
from airflow_provider_pepipost.plugins.campaign_html import render_page
from airflow_provider_pepipost.status.reports import EXPORT_COLUMNS
from airflow_provider_pepipost.status.resolver import resolve_store_url
from airflow_provider_pepipost.status.store import StatusStore

# (request) -> None, raising HTTPException when the user may not read the DAG's runs.
Authorize = Callable[..., Any]
# (request, dag_id) -> whether the user may see whole numbers.
MayEdit = Callable[[Request, str], Any]


def airflow_auth() -> tuple[Authorize, MayEdit]:
    """Airflow's own checks, imported on first use (only the API server has them): the signed-in
    user from the UI's cookie or a Bearer token, then read (or edit) access to the DAG's runs."""

    async def user_of(request: Request) -> Any:
        from airflow.api_fastapi.core_api.security import bearer_scheme, get_user

        return await get_user(request, None, await bearer_scheme(request))

    def may(method: str, request: Request, dag_id: str, user: Any) -> bool:
        from airflow.api_fastapi.app import get_auth_manager
        from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
        from airflow.models.dag import DagModel

        team = DagModel.get_team_name(dag_id) if hasattr(DagModel, "get_team_name") else None
        return get_auth_manager().is_authorized_dag(
            method=method, access_entity=DagAccessEntity.RUN, details=DagDetails(id=dag_id, team_name=team), user=user
        )

    async def authorize(request: Request) -> None:
        from fastapi import HTTPException

        user = await user_of(request)  # 401 when nobody is signed in
        if not await run_in_threadpool(may, "GET", request, request.path_params["dag_id"], user):
            raise HTTPException(status_code=403, detail="Forbidden")

    async def may_edit(request: Request, dag_id: str) -> bool:
        return await run_in_threadpool(may, "PUT", request, dag_id, await user_of(request))

    return authorize, may_edit


def create_campaign_app(
    store_url: str | None = None, *, auth: tuple[Authorize, MayEdit] | None = None, send_summaries: Any = None
) -> FastAPI:
    """The page app. ``auth`` defaults to Airflow's (the API server's auth manager);
    ``send_summaries(dag_id, run_id, task_id)`` gives the send tasks' ``send_summary`` XComs."""
    authorize, may_edit = auth or airflow_auth()
    read_summaries = send_summaries or xcom_send_summaries
    app = FastAPI(title="Pepipost campaign page", docs_url=None, redoc_url=None, openapi_url=None)
    holder: dict[str, StatusStore] = {}

    def store() -> StatusStore:
        if "store" not in holder:  # resolved on first use: importing the plugin touches no database
            holder["store"] = StatusStore(store_url or resolve_store_url())
        return holder["store"]

    guarded = [Depends(authorize)]

    async def page(request: Request, dag_id: str, run_id: str, task_id: str | None) -> HTMLResponse:
        report = await run_in_threadpool(lambda: store().campaign_report(dag_id, run_id, task_id))
        summaries = await run_in_threadpool(read_summaries, dag_id, run_id, task_id)
        scope = f"DAG {dag_id}, run {run_id}" + (f", task {task_id}" if task_id else ", every send task")
        html = render_page(
            report,
            title="WhatsApp campaign" + (f": {task_id}" if task_id else ""),
            scope=scope,
            csv_url=str(request.url.path).rstrip("/") + "/export.csv",
            summary_counts={"suppressed": sum(s.get("suppressed", 0) for s in summaries)},
        )
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    async def export(request: Request, dag_id: str, run_id: str, task_id: str | None) -> StreamingResponse:
        whole = may_edit(request, dag_id)
        whole = bool(await whole if inspect.isawaitable(whole) else whole)
        rows = store().export_campaign(dag_id, run_id, task_id, full_numbers=whole)
        name = f"whatsapp-campaign-{dag_id}-{run_id}{'-' + task_id if task_id else ''}.csv".replace("/", "_")
        return StreamingResponse(
            _csv_lines(rows),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{name}"', "Cache-Control": "no-store"},
        )

    async def report_json(dag_id: str, run_id: str, task_id: str | None) -> JSONResponse:
        report = await run_in_threadpool(lambda: store().campaign_report(dag_id, run_id, task_id))
        return JSONResponse({"funnel": report.funnel, "total": report.total, "tasks": report.tasks})

    @app.get("/dags/{dag_id}/runs/{run_id}", dependencies=guarded, response_class=HTMLResponse)
    async def run_page(request: Request, dag_id: str, run_id: str) -> HTMLResponse:
        return await page(request, dag_id, run_id, None)

    @app.get("/dags/{dag_id}/runs/{run_id}/tasks/{task_id}", dependencies=guarded, response_class=HTMLResponse)
    async def task_page(request: Request, dag_id: str, run_id: str, task_id: str) -> HTMLResponse:
        return await page(request, dag_id, run_id, task_id)

    @app.get("/dags/{dag_id}/runs/{run_id}/export.csv", dependencies=guarded)
    async def run_export(request: Request, dag_id: str, run_id: str) -> StreamingResponse:
        return await export(request, dag_id, run_id, None)

    @app.get("/dags/{dag_id}/runs/{run_id}/tasks/{task_id}/export.csv", dependencies=guarded)
    async def task_export(request: Request, dag_id: str, run_id: str, task_id: str) -> StreamingResponse:
        return await export(request, dag_id, run_id, task_id)

    @app.get("/dags/{dag_id}/runs/{run_id}/report.json", dependencies=guarded)
    async def run_report(dag_id: str, run_id: str) -> JSONResponse:
        return await report_json(dag_id, run_id, None)

    return app


def _csv_lines(rows: Iterator[tuple[Any, ...]]) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(EXPORT_COLUMNS)
    for count, row in enumerate(rows, 1):
        writer.writerow(row)
        if count % 1000 == 0:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


def xcom_send_summaries(dag_id: str, run_id: str, task_id: str | None) -> list[dict[str, Any]]:
    """The ``send_summary`` XComs of a run's send tasks, from Airflow's database (the API server's)."""
    try:
        from airflow.models.xcom import XComModel
        from airflow.utils.session import create_session
        from sqlalchemy import select

        query = select(XComModel.value).where(
            XComModel.dag_id == dag_id, XComModel.run_id == run_id, XComModel.key == "send_summary"
        )
        if task_id is not None:
            query = query.where(XComModel.task_id == task_id)
        with create_session() as session:
            values = session.scalars(query).all()
    except Exception:  # the page still shows what the status store knows
        return []
    return [XComModel.deserialize_value(_Row(v)) if not isinstance(v, dict) else v for v in values]


class _Row:
    """What ``XComModel.deserialize_value`` reads: an object with ``value``."""

    def __init__(self, value: Any) -> None:
        self.value = value


class PepipostCampaignPagePlugin(AirflowPlugin):
    """The page, with a tab on every DAG run and task instance in the UI (and the send operators'
    extra link)."""

    name = "pepipost_campaign_page"
    fastapi_apps = [{"app": create_campaign_app(), "url_prefix": PAGE_PREFIX, "name": "Pepipost campaign page"}]
    external_views = [
        {
            "name": "WhatsApp campaign",
            "href": PAGE_PREFIX + "/dags/{DAG_ID}/runs/{RUN_ID}",
            "destination": "dag_run",
            "url_route": RUN_VIEW_ROUTE,
        },
        {
            "name": "WhatsApp campaign",
            "href": PAGE_PREFIX + "/dags/{DAG_ID}/runs/{RUN_ID}/tasks/{TASK_ID}",
            "destination": "task",
            "url_route": TASK_VIEW_ROUTE,
        },
    ]

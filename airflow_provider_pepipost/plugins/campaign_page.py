"""The campaign page in Airflow's UI: ``/pepipost-campaigns/dags/{dag_id}/runs/{run_id}[/tasks/{task_id}]``.

Served by the API server (the provider's plugin mounts it). Plugin endpoints are not covered by
Airflow's auth on their own: every route here asks Airflow's auth manager, as the core API does,
for the signed-in user (the UI's session cookie or a Bearer token) and for read access to the
DAG's runs; without it the answer is 401 or 403 and names nothing of the DAG. Numbers are masked
in the page, in free text too; the CSV holds them whole only for users who may also edit the DAG.
The CSV is data, never formulas: a cell that a spreadsheet would run is quoted.
"""

from __future__ import annotations

import csv
import inspect
import io
import json
import logging
import re
from collections.abc import Callable, Iterator
from typing import Any, Literal

from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from airflow_provider_pepipost import limits
from airflow_provider_pepipost.connection_form import DEFAULT_CONN_ID
from airflow_provider_pepipost.operators.links import PAGE_PREFIX, RUN_VIEW_ROUTE, TASK_VIEW_ROUTE
from airflow_provider_pepipost.plugins.campaign_html import render_page
from airflow_provider_pepipost.status.reports import EXPORT_COLUMNS, check_rate_card
from airflow_provider_pepipost.status.store import StatusStore, open_store

# (request) -> None, raising HTTPException when the user may not read the DAG's runs.
Authorize = Callable[..., Any]
# (request, dag_id) -> whether the user may see whole numbers.
MayEdit = Callable[[Request, str], Any]
# () -> the rate card the page prices billable messages by, or None.
RateCard = Callable[[], Any]

log = logging.getLogger(__name__)
# A spreadsheet runs a cell that starts with one of these (OWASP, "CSV injection").
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_UNSAFE_FILE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def airflow_auth() -> tuple[Authorize, MayEdit]:
    """Airflow's own checks, imported on first use (only the API server has them): the signed-in
    user from the UI's cookie or a Bearer token, then read (or edit) access to the DAG's runs."""

    async def user_of(request: Request) -> Any:
        from airflow.api_fastapi.core_api.security import bearer_scheme, get_user

        return await get_user(request, None, await bearer_scheme(request))

    def may(method: Literal["GET", "PUT"], request: Request, dag_id: str, user: Any) -> bool:
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
    store_url: str | None = None, *, auth: tuple[Authorize, MayEdit] | None = None, rate_card: RateCard | None = None
) -> FastAPI:
    """The page app. ``auth`` defaults to Airflow's (the API server's auth manager); ``rate_card``
    to the Pepipost connection's extra ``rate_card``."""
    authorize, may_edit = auth or airflow_auth()
    pages = CampaignPages(store_url, may_edit, rate_card or connection_rate_card)
    app = FastAPI(title="Pepipost campaign page", docs_url=None, redoc_url=None, openapi_url=None)
    # Ids are checked before anything else: a NUL or an over-long id never reaches the database.
    _add_routes(app, pages, guarded=[Depends(valid_ids), Depends(authorize)])
    return app


class CampaignPages:
    """What the routes answer: the page, its CSV and its JSON, from one status store."""

    def __init__(self, store_url: str | None, may_edit: MayEdit, card_of: RateCard) -> None:
        self.store_url, self.may_edit, self.card_of = store_url, may_edit, card_of
        self._store: StatusStore | None = None

    def store(self) -> StatusStore:
        if self._store is None:  # resolved on first use: importing the plugin touches no database
            self._store = open_store(url=self.store_url)
        return self._store

    async def page(self, request: Request, dag_id: str, run_id: str, task_id: str | None) -> HTMLResponse:
        card = await run_in_threadpool(self.card_of)
        report = await run_in_threadpool(lambda: self.store().campaign_report(dag_id, run_id, task_id, rate_card=card))
        scope = f"DAG {dag_id}, run {run_id}" + (f", task {task_id}" if task_id else ", every send task")
        html = render_page(
            report,
            title="WhatsApp campaign" + (f": {task_id}" if task_id else ""),
            scope=scope,
            csv_url=str(request.url.path).rstrip("/") + "/export.csv",
        )
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    async def export(self, request: Request, dag_id: str, run_id: str, task_id: str | None) -> StreamingResponse:
        whole = self.may_edit(request, dag_id)
        whole = bool(await whole if inspect.isawaitable(whole) else whole)
        # The first rows are read before the answer starts: a query that fails is a 500, never a 200.
        lines = _csv_lines(self.store().export_campaign(dag_id, run_id, task_id, full_numbers=whole))
        first = await run_in_threadpool(next, lines)
        name = _file_name(f"whatsapp-campaign-{dag_id}-{run_id}{'-' + task_id if task_id else ''}") + ".csv"
        return StreamingResponse(
            _chain(first, lines),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{name}"', "Cache-Control": "no-store"},
        )

    async def report_json(self, dag_id: str, run_id: str, task_id: str | None) -> JSONResponse:
        report = await run_in_threadpool(lambda: self.store().campaign_report(dag_id, run_id, task_id))
        return JSONResponse(
            {"rows": report.rows, "states": report.states, "messages": report.messages, "statuses": report.statuses}
        )


def _add_routes(app: FastAPI, pages: CampaignPages, guarded: list[Any]) -> None:
    """One route a URL, each behind ``guarded``: the run's and the task's page and CSV, the run's JSON."""

    @app.get("/dags/{dag_id}/runs/{run_id}", dependencies=guarded, response_class=HTMLResponse)
    async def run_page(request: Request, dag_id: str, run_id: str) -> HTMLResponse:
        return await pages.page(request, dag_id, run_id, None)

    @app.get("/dags/{dag_id}/runs/{run_id}/tasks/{task_id}", dependencies=guarded, response_class=HTMLResponse)
    async def task_page(request: Request, dag_id: str, run_id: str, task_id: str) -> HTMLResponse:
        return await pages.page(request, dag_id, run_id, task_id)

    @app.get("/dags/{dag_id}/runs/{run_id}/export.csv", dependencies=guarded)
    async def run_export(request: Request, dag_id: str, run_id: str) -> StreamingResponse:
        return await pages.export(request, dag_id, run_id, None)

    @app.get("/dags/{dag_id}/runs/{run_id}/tasks/{task_id}/export.csv", dependencies=guarded)
    async def task_export(request: Request, dag_id: str, run_id: str, task_id: str) -> StreamingResponse:
        return await pages.export(request, dag_id, run_id, task_id)

    @app.get("/dags/{dag_id}/runs/{run_id}/report.json", dependencies=guarded)
    async def run_report(dag_id: str, run_id: str) -> JSONResponse:
        return await pages.report_json(dag_id, run_id, None)


def valid_ids(request: Request) -> None:
    """400 for a DAG, run or task id no Airflow id can be: a control character (%00), or too long."""
    for name, value in request.path_params.items():
        if len(value) > limits.AIRFLOW_ID_MAX or any(ord(char) < 32 or ord(char) == 127 for char in value):
            raise HTTPException(status_code=400, detail=f"{name} is not a valid Airflow id")


def connection_rate_card(conn_id: str = DEFAULT_CONN_ID) -> dict[str, Any] | None:
    """The Pepipost connection's extra ``rate_card`` (a dict, or its JSON), checked; None without one.

    Read where the page runs (the API server, which may read connections); a card that is not
    valid is logged and left out, the page still renders.
    """
    try:
        from airflow.models.connection import Connection

        extra = Connection.get_connection_from_secrets(conn_id).extra_dejson
    except Exception:  # no such connection: no card
        return None
    card = extra.get("rate_card")
    if card in (None, "", {}):
        return None
    try:
        return check_rate_card(json.loads(card) if isinstance(card, str) else card)
    except ValueError as err:
        log.warning("The %s connection's extra rate_card is left out: %s", conn_id, err)
        return None


def _file_name(name: str) -> str:
    """A download's name that no header parameter can be smuggled into."""
    return _UNSAFE_FILE_NAME.sub("_", name)[:150].strip("._") or "whatsapp-campaign"


def _cell(value: Any) -> Any:
    """A CSV cell a spreadsheet shows as text: one that would start a formula gets a leading quote."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def _chain(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest


def _csv_lines(rows: Iterator[tuple[Any, ...]]) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(EXPORT_COLUMNS)
    for count, row in enumerate(rows, 1):
        writer.writerow([_cell(value) for value in row])
        if count % 1000 == 0:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


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
            # The task instance's tab (the task overview has no run to show).
            "name": "WhatsApp campaign",
            "href": PAGE_PREFIX + "/dags/{DAG_ID}/runs/{RUN_ID}/tasks/{TASK_ID}",
            "destination": "task_instance",
            "url_route": TASK_VIEW_ROUTE,
        },
    ]

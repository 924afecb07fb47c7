"""Asset events for campaigns: what a send task and a delivery sensor tell other DAGs.

A send task emits ``pepipost://campaign/<dag_id>/<task_id>`` with its ``send_summary`` as the
event's extra; a status sensor emits ``pepipost://delivery/<dag_id>/<task_id>`` with the delivery
counts. A downstream DAG scheduled on either runs after it and reads the figures from
``triggering_asset_events``. Events are emitted only when the task succeeds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from airflow.sdk import Asset

SCHEME = "pepipost"


def campaign_asset_uri(kind: str, dag_id: str, task_id: str) -> str:
    """``pepipost://campaign/<dag_id>/<task_id>`` (kind ``campaign``) or ``.../delivery/...``."""
    return f"{SCHEME}://{kind}/{dag_id}/{task_id}"


def resolve_asset(value: Asset | str | bool | None, kind: str, dag_id: str, task_id: str) -> Asset | None:
    """The asset a task emits: the default URI (None or True), a name of the user's (a string,
    kept as the asset's name with the default URI's scheme), the user's Asset, or none (False)."""
    if value is False:
        return None
    if isinstance(value, Asset):
        return value
    if isinstance(value, str) and value:
        return Asset(name=value, uri=f"{SCHEME}://{kind}/{value}")
    uri = campaign_asset_uri(kind, dag_id, task_id)
    return Asset(name=uri, uri=uri)


def emit(context: Mapping[str, Any], asset: Asset | None, extra: dict[str, Any]) -> None:
    """Attach ``extra`` to the asset event this task instance emits on success."""
    events = context.get("outlet_events")
    if asset is None or events is None:  # no asset, or run outside a task runner
        return
    ti = context.get("ti")
    where = {"run_id": getattr(ti, "run_id", None), "map_index": getattr(ti, "map_index", -1)}
    events[asset].extra = {**where, **extra}

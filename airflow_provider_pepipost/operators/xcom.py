"""The XCom contract between the send operators and the status sensor.

A send task returns its accepted message ids in input order and, when some rows' outcome is
unknown (or the send is too big to list), a ledger reference: ``{"pepipost_ledger": {"dag_id",
"run_id", "task_id", "map_index"[, "outcome": "unknown"][, "campaign"]}}``. The sensor takes any
mix of ids and references, also a mapped send's list of lists, or the same as JSON text.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from airflow_provider_pepipost.status.ledger import TaskKey

LEDGER_REF = "pepipost_ledger"


class SentRow(Protocol):
    """What the contract needs of one row's outcome."""

    @property
    def message_id(self) -> str | None: ...
    @property
    def state(self) -> str: ...
    @property
    def reconciled(self) -> bool: ...


def ledger_ref(task: TaskKey) -> dict[str, Any]:
    """The XCom form of 'what this task instance sent', for sends too big to list."""
    ref: dict[str, Any] = {
        "dag_id": task.dag_id,
        "run_id": task.run_id,
        "task_id": task.task_id,
        "map_index": task.map_index,
    }
    if task.only_unknown:
        ref["outcome"] = "unknown"
    if task.campaign is not None:
        ref["campaign"] = task.campaign
    return {LEDGER_REF: ref}


def is_ledger_ref(value: Any) -> bool:
    return isinstance(value, Mapping) and LEDGER_REF in value


def task_from_ref(ref: Mapping[str, Any]) -> TaskKey:
    fields = dict(ref[LEDGER_REF])
    only_unknown = fields.pop("outcome", None) == "unknown"
    return TaskKey(**fields, only_unknown=only_unknown)


def message_targets(outcomes: Sequence[SentRow], task: TaskKey) -> list[Any]:
    """A send task's ``return_value``: the accepted ids in input order, then a reference to the
    unknown rows if there are any.

    A row reconciled from a report after an unknown outcome is counted through the reference,
    not listed, so that no row counts twice.
    """
    targets: list[Any] = [o.message_id for o in outcomes if o.message_id is not None and not o.reconciled]
    if any(o.state == "unknown" or o.reconciled for o in outcomes):
        targets.append(ledger_ref(dataclasses.replace(task, only_unknown=True)))
    return targets


def parse_message_targets(value: Any) -> list[str | TaskKey]:
    """Message ids and ledger references from an XCom value, flattened.

    Takes a list of ids, a ledger reference, or a list of either (a mapped send task's XCom).
    """
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith(("[", "{")):
            return parse_message_targets(json.loads(text))
        return [text] if text else []
    if is_ledger_ref(value):
        return [task_from_ref(value)]
    if isinstance(value, Mapping):
        raise ValueError(f"message_ids: a dict must be a ledger reference {{'{LEDGER_REF}': {{...}}}}")
    targets: list[str | TaskKey] = []
    for item in value:
        targets.extend(parse_message_targets(item))
    return targets

"""Readers of the status store that only the tests need: one message's status, the dead letters."""

from __future__ import annotations

from sqlalchemy import select

from airflow_provider_pepipost.status import schema
from airflow_provider_pepipost.status.store import StatusStore


def current_status(store: StatusStore, message_id: str) -> str | None:
    st = schema.message_status
    with store.engine.connect() as conn:
        return conn.execute(select(st.c.status).where(st.c.message_id == message_id)).scalar()


def dead_letters(store: StatusStore, limit: int = 100) -> list[tuple[str, str]]:
    """(reason, raw) of the first ``limit`` dead letters, oldest first."""
    dl = schema.dead_letters
    with store.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(select(dl.c.reason, dl.c.raw).order_by(dl.c.id).limit(limit))]

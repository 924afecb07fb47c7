"""PurgeStatusStoreOperator: the status store's retention as a scheduled Airflow task."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from airflow_provider_pepipost.errors import PepipostConfigError
from airflow_provider_pepipost.status.resolver import store_source
from airflow_provider_pepipost.status.retention import DEFAULT_PURGE_BATCH
from airflow_provider_pepipost.status.store import open_store
from airflow_provider_pepipost.version_compat import AirflowFailException

if TYPE_CHECKING:
    from airflow.sdk import Context


class PurgeStatusStoreOperator(BaseOperator):
    """Delete what the status store holds beyond ``older_than_days``: delivery events, replies,
    dead letters, finished ledger rows, campaign rows, statuses and consent calls. Never the
    suppression list: a STOP is kept however old.

    Deletes in batches of ``batch_size`` rows, one short transaction each, so that a receiver
    writing to the same store waits for one batch at most. A send task whose ledger rows were
    purged must not be cleared again (it would not know what it sent): keep ``older_than_days``
    well past how far back anybody clears a run.

    :param older_than_days: the cut-off, in days. (templated)
    :param batch_size: rows per transaction.
    :param dry_run: count what would be deleted, delete nothing.
    :param status_store_conn_id: Airflow connection of the status store (as the send operators).

    Returns (XCom ``return_value``) the rows deleted (or that would be) per table.
    """

    template_fields: Sequence[str] = ("older_than_days",)
    ui_color = "#dde4e8"

    def __init__(
        self,
        *,
        older_than_days: float = 90,
        batch_size: int = DEFAULT_PURGE_BATCH,
        dry_run: bool = False,
        status_store_conn_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.older_than_days = older_than_days
        self.batch_size = batch_size
        # Not ``self.dry_run``: that is BaseOperator's method (render the template fields), which
        # an attribute of that name would hide.
        self.count_only = dry_run
        self.status_store_conn_id = status_store_conn_id

    def execute(self, context: Context) -> dict[str, int]:
        self.log.info("Status store: %s", store_source(self.status_store_conn_id))
        store = open_store(self.status_store_conn_id)
        try:
            days = float(self.older_than_days)
            deleted = store.purge(days, batch_size=self.batch_size, dry_run=self.count_only)
        except (PepipostConfigError, ValueError) as err:
            raise AirflowFailException(f"older_than_days / batch_size: {err}") from err
        verb = "Would delete" if self.count_only else "Deleted"
        self.log.info(
            "%s %d rows older than %g days: %s", verb, sum(deleted.values()), days,
            ", ".join(f"{table} {count}" for table, count in deleted.items()),
        )  # fmt: skip
        return deleted

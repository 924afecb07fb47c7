"""The SQLite store's write-ahead log checkpointed on a thread of its own: the log stays small while
commits come, no commit checkpoints it below the backstop, the thread ends when commits stop."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import create_engine, event, text

from airflow_provider_pepipost.status import wal
from airflow_provider_pepipost.status.engines import _sqlite_pragmas
from airflow_provider_pepipost.status.wal import BACKSTOP_PAGES, WalCheckpoints, checkpoints_for
from tests.helpers import wait_until

PAGE = 4096


def sqlite_engine(path: Path):
    """An engine as the store makes one (WAL, synchronous=NORMAL), of its own: no other test shares it."""
    engine = create_engine(f"sqlite:///{path}")
    event.listen(engine, "connect", _sqlite_pragmas)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE blobs (id INTEGER PRIMARY KEY, data BLOB)"))
    return engine


def wal_pages(path: Path) -> int:
    wal_file = Path(f"{path}-wal")
    return wal_file.stat().st_size // PAGE if wal_file.exists() else 0


def write_commits(engine, path: Path, commits: int, pages_each: int, pause: float) -> int:
    """``commits`` commits of ``pages_each`` pages of new rows each; the largest the log got, in pages."""
    largest = 0
    for _ in range(commits):
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO blobs (data) VALUES (:data)"), {"data": os.urandom(pages_each * PAGE)})
        largest = max(largest, wal_pages(path))
        time.sleep(pause)
    return largest


def test_the_log_stays_small_while_commits_come(tmp_path):
    path = tmp_path / "store.db"
    engine = sqlite_engine(path)
    checkpoints = checkpoints_for(engine)
    # 3,000 pages over at least 0.9 s: with nobody checkpointing below the backstop the log would hold
    # all of them; the thread copies them back every CHECKPOINT_EVERY seconds.
    largest = write_commits(engine, path, commits=300, pages_each=10, pause=0.003)
    assert checkpoints.checkpoints >= 3
    assert largest < 1500, f"the log reached {largest} pages"
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM blobs")).scalar() == 300
    engine.dispose()


def test_without_the_thread_the_log_holds_every_page_below_the_backstop(tmp_path):
    """The control of the test above: the backstop alone, no thread; the log keeps all 3,000 pages."""
    path = tmp_path / "store.db"
    engine = sqlite_engine(path)
    event.listen(engine, "checkout", wal._raise_backstop)
    assert write_commits(engine, path, commits=300, pages_each=10, pause=0) >= 3000
    engine.dispose()


def test_the_engines_connections_checkpoint_themselves_only_past_the_backstop(tmp_path):
    engine = sqlite_engine(tmp_path / "store.db")
    checkpoints_for(engine)
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA wal_autocheckpoint")).scalar() == BACKSTOP_PAGES
    assert checkpoints_for(engine) is checkpoints_for(engine)  # one per engine
    engine.dispose()


def test_the_thread_ends_when_commits_stop_and_the_next_commit_starts_it(tmp_path):
    path = tmp_path / "store.db"
    engine = sqlite_engine(path)
    checkpoints = WalCheckpoints(engine, every=0.01, idle_exit=0.1)
    write_commits(engine, path, commits=1, pages_each=1, pause=0)
    assert checkpoints.running()
    assert wait_until(lambda: not checkpoints.running(), timeout=10), "the idle thread did not end"
    assert checkpoints.checkpoints >= 1
    write_commits(engine, path, commits=1, pages_each=1, pause=0)
    assert checkpoints.running()
    engine.dispose()


def test_a_failed_checkpoint_is_logged_a_few_times_and_the_thread_goes_on(tmp_path, caplog):
    path = tmp_path / "store.db"
    engine = sqlite_engine(path)
    checkpoints = WalCheckpoints(engine, every=0.01, idle_exit=5)

    def no_connection():
        raise OSError("disk gone")

    checkpoints.engine = SimpleNamespace(raw_connection=no_connection)  # type: ignore[assignment]  # its own only
    with caplog.at_level(logging.WARNING, logger=wal.__name__):
        for _ in range(10):
            write_commits(engine, path, commits=1, pages_each=1, pause=0.02)
    failures = [r.getMessage() for r in caplog.records if "background checkpoint" in r.getMessage()]
    assert len(failures) == 3, failures  # not one per checkpoint
    assert "disk gone" in failures[0] and f"past {BACKSTOP_PAGES} pages" in failures[0]
    assert checkpoints.running() and checkpoints.checkpoints == 0
    engine.dispose()


def test_only_sqlite_has_a_write_ahead_log_to_checkpoint():
    engine = create_engine("postgresql+psycopg2://nobody@127.0.0.1:1/none")
    with pytest.raises(ValueError, match="SQLite's, not postgresql's"):
        checkpoints_for(engine)

"""The SQLite store's write-ahead log checkpointed on a thread of its own: the log stays within the
backstop however the commits come, no commit checkpoints it below that, the thread ends when commits
stop or the engine is disposed, and nothing it meets ever undoes a commit."""

from __future__ import annotations

import gc
import logging
import os
import sqlite3
import threading
import time
import weakref
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


def test_back_to_back_commits_keep_the_log_within_the_backstop(tmp_path):
    """Commits with no pause between them never let a checkpoint restart the log: past the backstop
    a commit checkpoints what the thread has not copied, and the log starts again from the top."""
    path = tmp_path / "store.db"
    engine = sqlite_engine(path)
    checkpoints = checkpoints_for(engine)
    largest = write_commits(engine, path, commits=3 * BACKSTOP_PAGES // 10, pages_each=10, pause=0)
    assert checkpoints.checkpoints >= 1
    # A commit past the backstop that meets the thread's checkpoint leaves it to the next one: the
    # log may go a little past it, never on and on (without it, all 6,000 pages stay in the log).
    assert largest < 1.5 * BACKSTOP_PAGES, f"the log reached {largest} pages"
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM blobs")).scalar() == 3 * BACKSTOP_PAGES // 10
    engine.dispose()


def test_below_the_backstop_no_commit_checkpoints_the_log(tmp_path):
    """The backstop alone, no thread: every page written stays in the log (SQLite's default would
    have checkpointed at 1,000, inside a commit)."""
    path = tmp_path / "store.db"
    engine = sqlite_engine(path)
    event.listen(engine, "checkout", wal._raise_backstop)
    assert (
        write_commits(engine, path, commits=(BACKSTOP_PAGES - 100) // 10, pages_each=10, pause=0)
        >= BACKSTOP_PAGES - 100
    )
    engine.dispose()


def test_the_engines_connections_checkpoint_themselves_only_past_the_backstop(tmp_path):
    engine = sqlite_engine(tmp_path / "store.db")
    checkpoints_for(engine)
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA wal_autocheckpoint")).scalar() == BACKSTOP_PAGES
    assert checkpoints_for(engine) is checkpoints_for(engine)  # one per engine
    engine.dispose()


def test_the_thread_ends_when_commits_stop_and_the_next_commit_starts_it_again(tmp_path):
    path = tmp_path / "store.db"
    engine = sqlite_engine(path)
    checkpoints = WalCheckpoints(engine, every=0.01, idle_exit=0.1)
    write_commits(engine, path, commits=1, pages_each=1, pause=0)
    assert wait_until(lambda: checkpoints.checkpoints == 1 and not checkpoints.running(), timeout=10)
    write_commits(engine, path, commits=1, pages_each=1, pause=0)
    assert wait_until(lambda: checkpoints.checkpoints == 2, timeout=10), "no thread checkpointed the second commit"
    engine.dispose()


def test_a_disposed_engine_ends_the_thread_and_is_not_kept_alive(tmp_path):
    path = tmp_path / "store.db"
    engine = sqlite_engine(path)
    checkpoints = WalCheckpoints(engine, every=0.05, idle_exit=60)
    write_commits(engine, path, commits=1, pages_each=1, pause=0)
    engine.dispose()  # before the thread's first wake-up: it must not open the database again
    assert wait_until(lambda: not checkpoints.running(), timeout=10)
    assert checkpoints.checkpoints == 0
    engine_ref = weakref.ref(engine)
    del engine
    gc.collect()
    assert engine_ref() is None, "the checkpoints kept the engine (its pool, its files) alive"


def test_a_failed_checkpoint_is_logged_at_most_once_a_minute_and_the_thread_goes_on(tmp_path, caplog):
    path = tmp_path / "store.db"
    engine = sqlite_engine(path)
    checkpoints = WalCheckpoints(engine, every=0.01, idle_exit=5)

    def no_connection():
        raise OSError("disk gone")

    broken = SimpleNamespace(raw_connection=no_connection)
    checkpoints._engine = lambda: broken  # type: ignore[assignment,return-value]  # its own engine only
    with caplog.at_level(logging.WARNING, logger=wal.__name__):
        for _ in range(10):
            write_commits(engine, path, commits=1, pages_each=1, pause=0.02)
        assert wait_until(lambda: checkpoints.failures >= 3, timeout=10)
    failures = [r.getMessage() for r in caplog.records if "background checkpoint" in r.getMessage()]
    assert len(failures) == 1, failures
    assert "disk gone" in failures[0] and f"past {BACKSTOP_PAGES} pages" in failures[0]
    assert checkpoints.running() and checkpoints.checkpoints == 0
    with engine.connect() as conn:  # every commit stored
        assert conn.execute(text("SELECT count(*) FROM blobs")).scalar() == 10
    engine.dispose()


def test_a_thread_that_cannot_start_never_undoes_the_commit(tmp_path, monkeypatch):
    """The listener runs as each transaction's connection goes back to the pool: an error there
    would reach the code that had just committed, as if its commit had failed."""
    path = tmp_path / "store.db"
    engine = sqlite_engine(path)
    checkpoints = WalCheckpoints(engine, every=0.01, idle_exit=0.1)

    def cannot_start(self):
        raise RuntimeError("can't start new thread")

    with monkeypatch.context() as patched:
        patched.setattr(threading.Thread, "start", cannot_start)
        write_commits(engine, path, commits=2, pages_each=1, pause=0)
    assert not checkpoints.running() and checkpoints.failures == 2
    write_commits(engine, path, commits=1, pages_each=1, pause=0)  # threads again: the next commit starts one
    assert wait_until(lambda: checkpoints.checkpoints >= 1, timeout=10)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM blobs")).scalar() == 3
    engine.dispose()


def test_only_sqlite_has_a_write_ahead_log_to_checkpoint():
    engine = create_engine("postgresql+psycopg2://nobody@127.0.0.1:1/none")
    with pytest.raises(ValueError, match="SQLite's, not postgresql's"):
        checkpoints_for(engine)


def test_a_checkin_while_the_thread_is_being_made_neither_hangs_nor_starts_two(tmp_path, monkeypatch):
    """Making a thread allocates; a garbage collection then may give a leaked connection back to the
    pool, which calls the listener again on the same thread, while the first call is under way."""
    path = tmp_path / "store.db"
    engine = sqlite_engine(path)
    checkpoints = WalCheckpoints(engine, every=0.01, idle_exit=0.2)
    made: list[threading.Thread] = []
    real_init = threading.Thread.__init__

    def init_with_a_checkin_inside(self, *args, **kwargs):
        if kwargs.get("name") == "pepipost-wal-checkpoints":
            made.append(self)
            checkpoints.committed()  # as the collector's checkin would, on this thread
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(threading.Thread, "__init__", init_with_a_checkin_inside)
    caller = threading.Thread(target=checkpoints.committed, name="a-commit", daemon=True)
    caller.start()
    caller.join(timeout=10)
    monkeypatch.undo()
    assert not caller.is_alive(), "the commit's checkin hung"
    assert len(made) == 1, f"{len(made)} threads made"
    assert wait_until(lambda: checkpoints.checkpoints >= 1, timeout=10)
    engine.dispose()


def test_a_log_grown_past_the_backstop_is_cut_back_when_it_restarts(tmp_path):
    """A reader on an old snapshot (or another process's commits) keeps the log from restarting: it
    grows past the backstop; once it restarts, its file is cut back rather than kept at its largest."""
    path = tmp_path / "store.db"
    engine = sqlite_engine(path)
    checkpoints_for(engine)
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM blobs").fetchall()  # holds its snapshot until the ROLLBACK
    assert write_commits(engine, path, commits=BACKSTOP_PAGES // 5, pages_each=10, pause=0) > 1.5 * BACKSTOP_PAGES
    reader.execute("ROLLBACK")
    reader.close()
    for _ in range(100):  # the thread copies the log; a commit past the backstop restarts it
        write_commits(engine, path, commits=1, pages_each=1, pause=0.02)
        if wal_pages(path) * PAGE <= wal.WAL_FILE_LIMIT:
            break
    assert wal_pages(path) * PAGE <= wal.WAL_FILE_LIMIT, f"the log file kept {wal_pages(path)} pages"
    engine.dispose()

"""Checkpoints of a SQLite store's write-ahead log on a thread of their own, off the commits' path.

SQLite copies its log back into the database (a checkpoint) inside the commit that takes the log
past ``wal_autocheckpoint`` pages (1,000 by default): under the receiver's load one commit in about
seventy took 6-7 ms instead of 0.4, a third of all the time spent committing, and every request
of that commit waited for it (docs/benchmarks.md, seventh pass). Attached to an engine, this runs
SQLite's non-blocking (PASSIVE) checkpoint from a thread of its own while commits come, and raises
the engine's own threshold to ``BACKSTOP_PAGES``: a log that this thread does not keep small (a
reader holding an old snapshot, a checkpoint that failed) is still checkpointed by the commits, as
before, only later. A checkpoint copies only what is committed and never blocks a writer, so a
commit's durability and its answer are unchanged.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import Any

from sqlalchemy import Engine, event

log = logging.getLogger(__name__)

CHECKPOINT_EVERY = 0.02  # seconds between checkpoints while commits come
IDLE_EXIT = 2.0  # the thread ends after this many seconds without a commit (the next one starts it)
BACKSTOP_PAGES = 10_000  # the engine's connections checkpoint themselves past this (SQLite's default: 1,000)
_BACKSTOP_SET = "pepipost_wal_backstop"  # a pooled connection's info key: its threshold is raised

_ATTACHED: weakref.WeakKeyDictionary[Engine, WalCheckpoints] = weakref.WeakKeyDictionary()
_ATTACHED_LOCK = threading.Lock()


def checkpoints_for(engine: Engine) -> WalCheckpoints:
    """The checkpointer attached to ``engine`` (a SQLite engine), attached on the first call."""
    if engine.dialect.name != "sqlite":
        raise ValueError(f"write-ahead log checkpoints are SQLite's, not {engine.dialect.name}'s")
    with _ATTACHED_LOCK:
        attached = _ATTACHED.get(engine)
        if attached is None:
            attached = _ATTACHED[engine] = WalCheckpoints(engine)
        return attached


class WalCheckpoints:
    """PASSIVE checkpoints of one SQLite engine's database, every ``every`` seconds while it commits.

    Every commit on the engine in this process wakes the thread (SQLAlchemy's ``commit`` event); it
    ends once commits have stopped for ``idle_exit`` seconds.
    """

    def __init__(self, engine: Engine, *, every: float = CHECKPOINT_EVERY, idle_exit: float = IDLE_EXIT) -> None:
        self.engine, self.every, self.idle_exit = engine, every, idle_exit
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._commits = 0  # since the last checkpoint
        self._last_commit = 0.0  # time.monotonic()
        self._failures_logged = 0
        self.checkpoints = 0  # PASSIVE checkpoints run (for tests and the curious)
        event.listen(engine, "checkout", _raise_backstop)
        event.listen(engine, "commit", self.committed)

    def committed(self, *_: Any) -> None:
        """A commit on the engine: the thread checkpoints it within ``every`` seconds."""
        with self._lock:
            self._commits += 1
            self._last_commit = time.monotonic()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pepipost-wal-checkpoints", daemon=True)
                self._thread.start()

    def running(self) -> bool:
        with self._lock:
            return self._thread is not None

    def _run(self) -> None:
        try:
            while True:
                time.sleep(self.every)
                with self._lock:
                    if not self._commits and time.monotonic() - self._last_commit >= self.idle_exit:
                        self._thread = None
                        return
                    due, self._commits = self._commits, 0
                if due:
                    self.checkpoint()
        except BaseException:
            with self._lock:
                self._thread = None  # the next commit starts another
            raise

    def checkpoint(self) -> None:
        """One PASSIVE checkpoint now: what is committed is copied back, without waiting for anyone.

        A failure (another process checkpointing, a disk error) is logged and left to the next
        checkpoint, or to the commits' own past ``BACKSTOP_PAGES``.
        """
        try:
            connection = self.engine.raw_connection()
            try:
                cursor = connection.cursor()
                cursor.execute("PRAGMA wal_checkpoint(PASSIVE)")
                cursor.fetchall()
                cursor.close()
            finally:
                connection.close()
            self.checkpoints += 1
        except Exception as err:
            self._failures_logged += 1
            if self._failures_logged <= 3:  # the same failure at every checkpoint would flood the log
                log.warning(
                    "SQLite store: a background checkpoint of the write-ahead log failed (%s: %s); the commits "
                    "checkpoint it themselves past %d pages",
                    type(err).__name__,
                    err,
                    BACKSTOP_PAGES,
                )


def _raise_backstop(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    """A connection checked out of the engine's pool: its own checkpoints start at ``BACKSTOP_PAGES``."""
    if record.info.get(_BACKSTOP_SET):
        return
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_PAGES}")
    cursor.close()
    record.info[_BACKSTOP_SET] = True

"""Checkpoints of a SQLite store's write-ahead log on a thread of their own, off the commits' path.

SQLite copies its log back into the database (a checkpoint) inside the commit that takes the log
past ``wal_autocheckpoint`` pages (1,000 by default): under the receiver's load one commit in about
seventy took 6-7 ms instead of 0.4, a third of all the time spent committing, and every request
of that commit waited for it (docs/benchmarks.md, seventh pass). Attached to an engine, this runs
SQLite's non-blocking (PASSIVE) checkpoint from a thread of its own while commits come, so that the
copying is done beside the commits. A log that commits keep growing cannot start again from its
beginning while they come (a checkpoint only lets the next writer restart it when no commit landed
during it), so the engine's own threshold stays, raised to ``BACKSTOP_PAGES``: past it a commit
checkpoints what the thread has not copied yet, which is little, and restarts the log. That bounds
the log of one process's commits; with several processes writing (``--workers``), or a reader
holding an old snapshot, it can grow further, and its file is cut back to ``WAL_FILE_LIMIT`` when it
restarts. A checkpoint copies only what is committed and never blocks a writer, so a commit's
durability and its answer are unchanged.
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
BACKSTOP_PAGES = 2000  # a commit checkpoints the log itself past this (SQLite's default: 1,000)
# Bytes the -wal file is cut back to when the log restarts: it never shrinks otherwise, and commits
# from other processes (``--workers``), or a long reader, may have grown it past the backstop.
WAL_FILE_LIMIT = BACKSTOP_PAGES * 4096
FAILURE_LOG_INTERVAL = 60.0  # seconds between two log lines about failed checkpoints
_BACKSTOP_SET = "pepipost_wal_backstop"  # a pooled connection's info key: its threshold is raised

_STARTING = threading.Thread(name="pepipost-wal-checkpoints-starting")  # a placeholder, never started
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

    Every connection given back to the engine's pool in this process, after each of its
    transactions, wakes the thread (a pool event: a ``commit`` listener would put SQLAlchemy's event
    checks on every statement); it ends once none has come back for ``idle_exit`` seconds, or the
    engine was disposed. It holds the engine weakly: attaching one keeps no engine, pool or file alive.
    """

    def __init__(self, engine: Engine, *, every: float = CHECKPOINT_EVERY, idle_exit: float = IDLE_EXIT) -> None:
        self._engine = weakref.ref(engine)
        self.every, self.idle_exit = every, idle_exit
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._commits = 0  # since the last checkpoint
        self._last_commit = float("-inf")  # time.monotonic()
        self._last_failure_logged = float("-inf")
        self.checkpoints = 0  # checkpoints run
        self.partial = 0  # of those, the ones that left pages behind (commits came meanwhile, a reader)
        self.failures = 0  # checkpoints that raised, threads that could not start
        event.listen(engine, "checkout", _raise_backstop)
        event.listen(engine, "checkin", self.committed)
        event.listen(engine, "engine_disposed", self._disposed)

    def committed(self, *_: Any) -> None:
        """A transaction on the engine ended: the thread checkpoints what it wrote within ``every`` seconds.

        Never raises: an error here would reach the code that gave the connection back. Allocates
        nothing under ``_lock``: a garbage collection there may give a leaked connection back to
        the pool, which calls this again on the same thread.
        """
        if threading.current_thread() is self._thread:  # its own checkpoint's connection: nothing new
            return
        with self._lock:
            self._commits += 1
            self._last_commit = time.monotonic()
            if self._thread is not None:
                return
            self._thread = _STARTING  # a start under way: a call meanwhile (that collection's) starts none
        # Only this call replaces the placeholder: no thread runs yet to end and clear it.
        thread = self._thread = threading.Thread(target=self._run, name="pepipost-wal-checkpoints", daemon=True)
        try:
            thread.start()
        except Exception as err:  # no thread to be had: the commits checkpoint past the backstop
            self._thread = None
            self._failed(err)

    def running(self) -> bool:
        with self._lock:
            return self._thread is not None

    def _disposed(self, _engine: Any) -> None:
        with self._lock:  # the thread ends at its next wake-up, without opening a connection again
            self._commits, self._last_commit = 0, float("-inf")

    def _run(self) -> None:
        try:
            while True:
                time.sleep(self.every)
                with self._lock:
                    due, self._commits = self._commits, 0
                    if not due and time.monotonic() - self._last_commit >= self.idle_exit:
                        self._thread = None
                        return
                if due:
                    self.checkpoint()
        except BaseException:
            with self._lock:
                self._thread = None  # the next commit starts another
            raise

    def checkpoint(self) -> None:
        """One PASSIVE checkpoint now: what is committed is copied back, without waiting for anyone.

        A failure (a disk error, the engine gone) is logged, at most once a minute, and left to the
        next checkpoint or to the commits past ``BACKSTOP_PAGES``.
        """
        engine = self._engine()
        if engine is None:
            return
        try:
            connection = engine.raw_connection()
            try:
                cursor = connection.cursor()
                cursor.execute("PRAGMA wal_checkpoint(PASSIVE)")
                held_back, log_pages, copied = cursor.fetchone() or (1, 0, 0)  # no row: nothing known copied
                cursor.close()
            finally:
                connection.close()
        except Exception as err:
            self._failed(err)
            return
        self.checkpoints += 1
        if held_back or copied < log_pages:
            self.partial += 1

    def _failed(self, err: Exception) -> None:
        """Count a failure; log it unless one was logged in the last minute (logged outside ``_lock``)."""
        with self._lock:
            self.failures += 1
            failures, now = self.failures, time.monotonic()
            if now - self._last_failure_logged < FAILURE_LOG_INTERVAL:
                return
            self._last_failure_logged = now
        log.warning(
            "SQLite store: a background checkpoint of the write-ahead log failed (%s: %s; %d failures so far); "
            "the commits checkpoint it themselves past %d pages",
            type(err).__name__,
            err,
            failures,
            BACKSTOP_PAGES,
        )


def _raise_backstop(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    """A connection checked out of the engine's pool: its own checkpoints start at ``BACKSTOP_PAGES``,
    and its restarts cut the file back to ``WAL_FILE_LIMIT``."""
    if record.info.get(_BACKSTOP_SET):
        return
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_PAGES}")
    cursor.execute(f"PRAGMA journal_size_limit={WAL_FILE_LIMIT}")
    cursor.close()
    record.info[_BACKSTOP_SET] = True

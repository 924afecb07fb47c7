"""The body deadlines: one timer per event loop for every read in flight (webhook.deadlines)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sys
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from airflow_provider_pepipost.webhook.app import create_app
from airflow_provider_pepipost.webhook.deadlines import PERIOD, Deadlines, _check
from tests.conftest import WEBHOOK_TOKEN

pytestmark = pytest.mark.skipif(sys.version_info < (3, 11), reason="Task.uncancel is Python 3.11's")


async def _never() -> None:
    await asyncio.Event().wait()


async def _soon(value: str, seconds: float) -> str:
    await asyncio.sleep(seconds)
    return value


def test_a_read_past_its_deadline_is_cut_with_timeout_error_soon_after_it():
    deadlines = Deadlines()
    cancelled = []

    async def read() -> None:
        try:
            await _never()
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def main() -> float:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await deadlines.within(0.2, read())
        return time.monotonic() - started

    took = asyncio.run(main())
    assert cancelled == [True]  # what was awaited was cancelled, not left running
    assert 0.2 <= took < 0.2 + PERIOD + 1.0


def test_a_read_in_time_returns_its_value_and_leaves_no_timer_behind():
    deadlines = Deadlines()

    async def main() -> tuple[str, bool]:
        value = await deadlines.within(5, _soon("body", 0.01))
        await asyncio.sleep(PERIOD * 3)  # the timer stops once nothing is in flight
        state = deadlines._loops[asyncio.get_running_loop()]
        return value, not state.checking and not state.due and not state.cut

    assert asyncio.run(main()) == ("body", True)


def test_a_cancellation_from_elsewhere_stays_a_cancellation():
    deadlines = Deadlines()

    async def main() -> None:
        task = asyncio.create_task(deadlines.within(5, _never()))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_a_cancellation_from_elsewhere_after_the_deadline_cut_stays_a_cancellation():
    # Cut by the deadline and cancelled by the server (its shutdown) before the task ran again:
    # the task must end cancelled, not with a TimeoutError its caller would answer with a 408.
    deadlines = Deadlines()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(deadlines.within(60, _never()))
        await asyncio.sleep(0)
        state = deadlines._loops[loop]
        state.due[task] = loop.time() - 1  # its deadline has passed: the next check cuts it
        _check(state)
        assert task in state.cut
        task.cancel()  # in the same turn, before the task runs again
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_each_read_in_flight_keeps_its_own_deadline():
    deadlines = Deadlines()

    async def one(limit: float, takes: float) -> str:
        try:
            return await deadlines.within(limit, _soon("in time", takes))
        except TimeoutError:
            return "cut"

    async def main() -> list[str]:
        return await asyncio.gather(one(0.1, 5), one(5, 0.3), one(0.2, 5), one(5, 0.01))

    assert asyncio.run(main()) == ["cut", "in time", "cut", "in time"]


def test_deadlines_hold_on_every_event_loop_that_uses_them():
    # The plugin's app outlives event loops in tests and in servers that restart theirs: a timer
    # armed on a loop that has ended must not leave the next loop's reads without one.
    deadlines = Deadlines()

    async def cut() -> str:
        try:
            return await deadlines.within(0.05, _never())
        except TimeoutError:
            return "cut"

    async def interrupted() -> None:  # a loop that ends with a read in flight and its timer armed
        task = asyncio.create_task(deadlines.within(5, _never()))
        await asyncio.sleep(0.01)
        task.cancel()

    def on_a_new_loop(main: Callable[[], Awaitable[Any]]) -> Any:
        return asyncio.run(asyncio.wait_for(main(), 5))  # a read never cut fails here, not hangs

    assert [on_a_new_loop(cut), on_a_new_loop(cut)] == ["cut", "cut"]
    on_a_new_loop(interrupted)
    assert on_a_new_loop(cut) == "cut"


def test_one_task_bounds_one_read_at_a_time():
    deadlines = Deadlines()

    async def main() -> None:
        with pytest.raises(RuntimeError, match="one await of a task at a time"):
            inner = asyncio.get_running_loop().create_future()
            await deadlines.within(5, deadlines.within(5, inner))

    asyncio.run(main())


def test_a_deadline_is_a_timeout_in_a_task_that_handled_a_cancellation_before():
    # As asyncio.timeout: cancellations are counted from the read's start, not from zero. A layer
    # that caught a cancellation earlier in the same task must not turn a 408 into a dropped request.
    deadlines = Deadlines()

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):  # caught, never uncancelled
            await asyncio.sleep(1)
        with pytest.raises(TimeoutError):
            await deadlines.within(0.05, _never())

    asyncio.run(asyncio.wait_for(main(), 5))


def test_event_loops_that_read_bodies_are_freed_once_closed(sqlite_url):
    # A test client, or a server that restarts its loop, closes a loop with a check still scheduled:
    # nothing of the receiver's may keep that loop (its selector, its handles) alive.
    app = create_app(sqlite_url, WEBHOOK_TOKEN, max_body_bytes=10)
    headers = [(b"x-pepipost-token", WEBHOOK_TOKEN.encode()), (b"content-type", b"application/json")]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/pepipost/webhook", "raw_path": b"/pepipost/webhook", "root_path": "",
             "query_string": b"", "headers": headers, "client": ("127.0.0.1", 5000),
             "server": ("127.0.0.1", 80)}  # fmt: skip

    async def one_report() -> int:
        messages = [{"type": "http.request", "body": b"x" * 20, "more_body": False}]
        sent: list[dict] = []

        async def receive() -> dict:
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        await app(scope, receive, send)
        return sent[0]["status"]

    freed = []
    for _ in range(5):
        loop = asyncio.new_event_loop()
        assert loop.run_until_complete(one_report()) == 413  # read (and too large): a check was scheduled
        loop.close()
        freed.append(weakref.ref(loop))
        del loop
    gc.collect()
    assert [ref for ref in freed if ref() is not None] == []


def test_a_cut_the_read_swallows_is_taken_back():
    # As asyncio.timeout: the task is left with no cancellation of the deadline's still counted.
    deadlines = Deadlines()

    async def swallows() -> str:
        try:
            await _never()
        except asyncio.CancelledError:
            return "swallowed"
        return "never"

    async def main() -> tuple[str, int]:
        task = asyncio.current_task()
        assert task is not None
        value = await deadlines.within(0.05, swallows())
        return value, task.cancelling()

    assert asyncio.run(asyncio.wait_for(main(), 5)) == ("swallowed", 0)

"""Deadlines for the bodies being read, all checked by one timer per event loop.

``asyncio.timeout`` arms a timer of the event loop for every await it bounds: 3.7 us a report of
the receiver's 70 or so on its event loop, where this is a dictionary entry (0.3 us). The price is
precision: a deadline is noticed up to ``PERIOD`` seconds late, which for a body given seconds to
arrive changes nothing.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")

PERIOD = 0.1  # seconds between two checks while any read is in flight


class _LoopDeadlines:
    """One event loop's reads in flight: their deadlines, the tasks cut, whether a check is due.

    Nothing here refers to the loop itself (a timer handle would): the loop is the key of a weak
    dictionary, and a closed loop must be freed with its entry.
    """

    def __init__(self) -> None:
        self.due: dict[asyncio.Task, float] = {}
        self.cut: set[asyncio.Task] = set()
        self.checking = False  # a check is scheduled on the loop


class Deadlines:
    """``await deadlines.within(seconds, awaitable)``: the awaitable's result, or TimeoutError once
    ``seconds`` have passed (up to ``PERIOD`` later), the awaitable then cancelled.

    As ``asyncio.timeout``: a cancellation from elsewhere stays a cancellation, counted against the
    cancellations the task already had when the read began. Needs Python 3.11 (``Task.uncancel``).
    """

    def __init__(self) -> None:
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopDeadlines] = weakref.WeakKeyDictionary()

    async def within(self, seconds: float, awaitable: Awaitable[T]) -> T:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        if task is None:  # not in a task (a bare coroutine run by hand): nothing to cancel
            raise RuntimeError("Deadlines.within must be awaited inside a task")
        state = self._loops.get(loop)
        if state is None:
            state = self._loops[loop] = _LoopDeadlines()
        if task in state.due:
            raise RuntimeError("Deadlines.within bounds one await of a task at a time")
        cancelling = task.cancelling()  # type: ignore[attr-defined]  # 3.11's
        state.due[task] = loop.time() + seconds
        if not state.checking:
            state.checking = True
            loop.call_later(PERIOD, _check, state)
        try:
            return await awaitable
        except asyncio.CancelledError:
            if task in state.cut:
                state.cut.discard(task)
                # Cut here, and by nobody else since the read began: the deadline's.
                if task.uncancel() <= cancelling:  # type: ignore[attr-defined]
                    raise TimeoutError from None
            raise
        finally:
            del state.due[task]
            if task in state.cut:  # cut, and the read swallowed it: taken back, as asyncio.timeout does
                state.cut.discard(task)
                task.uncancel()  # type: ignore[attr-defined]


def _check(state: _LoopDeadlines) -> None:
    """Cut the reads past their deadline; again in ``PERIOD`` while any is in flight."""
    loop = asyncio.get_running_loop()
    now = loop.time()
    for task, due in state.due.items():
        if due <= now and task not in state.cut:
            state.cut.add(task)
            task.cancel()
    if state.due:
        loop.call_later(PERIOD, _check, state)
    else:
        state.checking = False

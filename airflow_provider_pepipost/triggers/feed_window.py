"""Which customer messages a reply feed has read and finished, by id, allowing for ids that commit late.

On PostgreSQL two receivers (or two transactions of one) take ids from one sequence and may
commit out of order: a reader can see message 10 while message 9 is still being written. A
cursor that jumped to 10 would skip 9 for ever. So the window delivers 10 at once but keeps the
missing 9 as a gap: the feed reads again from below it, delivers 9 when it appears, and lets
the cursor pass a gap only once it has stayed empty for ``gap_wait`` seconds (an id that never
commits: a rolled-back transaction, or a duplicate that ``ON CONFLICT DO NOTHING`` dropped after
it took its id). Pure bookkeeping, no I/O; times come from the caller's monotonic clock.
"""

from __future__ import annotations

from collections.abc import Iterable

# How long an id missing below read ones may still commit; past it the cursor moves over it.
DEFAULT_GAP_WAIT = 30.0


class FeedWindow:
    """The ids a feed has read above its floor, the gaps between them, and which ids are done.

    ``read_floor``: every id up to it was read or given up as a gap; the next read starts above it.
    ``done_floor``: every id up to it is done (its events stored) or a gap given up on; this is
    what the store's cursor may be moved to.
    """

    def __init__(self, start: int, gap_wait: float = DEFAULT_GAP_WAIT) -> None:
        self.read_floor = start
        self.done_floor = start
        self.gap_wait = gap_wait
        self._read: set[int] = set()  # ids above read_floor already delivered
        self._done: set[int] = set()  # ids above done_floor whose events are stored
        self._gap_seen: dict[int, float] = {}  # missing id -> when it was first seen missing

    def take(self, ids: Iterable[int], now: float) -> list[int]:
        """Of the ids a read returned (ascending), the ones not delivered before; notes the gaps below them."""
        new = [inbound_id for inbound_id in ids if inbound_id > self.read_floor and inbound_id not in self._read]
        self._read.update(new)
        previous = self.read_floor
        for inbound_id in sorted(self._read):
            for missing in range(previous + 1, inbound_id):
                self._gap_seen.setdefault(missing, now)
            previous = inbound_id
        for inbound_id in new:
            self._gap_seen.pop(inbound_id, None)
        self.read_floor = self._settle(self.read_floor, self._read, now)
        return new

    def finish(self, ids: Iterable[int], now: float) -> int:
        """Mark ids done (their events stored); returns the new ``done_floor``."""
        self._done.update(inbound_id for inbound_id in ids if inbound_id > self.done_floor)
        self.done_floor = self._settle(self.done_floor, self._done, now)
        return self.done_floor

    def _settle(self, floor: int, passed: set[int], now: float) -> int:
        """Move ``floor`` over ids in ``passed`` and over gaps that stayed empty long enough."""
        while True:
            following = floor + 1
            if following in passed:
                passed.discard(following)
            elif now - self._gap_seen.get(following, now) < self.gap_wait or following not in self._gap_seen:
                break
            floor = following
        # A gap both floors have passed is of no more use.
        lowest = min(self.read_floor, self.done_floor, floor)
        for gap in [gap for gap in self._gap_seen if gap <= lowest]:
            del self._gap_seen[gap]
        return floor

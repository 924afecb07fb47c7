"""The consent engine's rules, as tables: what the store holds decides whether a batch is reused,
left for a later try, skipped or called, and which of its rows are called; what a failed call
means decides refused, stopped or tried again. Then the engine itself, between a fake vendor and a
fake store: no network, no database, no Airflow."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import pytest

from airflow_provider_pepipost.consent import ConsentRow
from airflow_provider_pepipost.errors import (
    PepipostApiError,
    PepipostError,
    PepipostNotSentError,
    PepipostOutcomeUnknownError,
)
from airflow_provider_pepipost.operators.consent_engine import (
    RACED,
    BatchAction,
    CallFailure,
    ConsentEngine,
    batch_key,
    decide_batch,
    failure_of,
    raced_key,
)
from airflow_provider_pepipost.status.consent import Consent, ConsentBatch
from airflow_provider_pepipost.status.ledger import TaskKey

A, B, C, D = "919800000001", "919800000002", "919800000003", "919800000004"
BATCH = [(0, ConsentRow(A, "web")), (1, ConsentRow(B, "web")), (2, ConsentRow(C, "web"))]
OUT = Consent(opted_out=True, revision=1)
IN = Consent(opted_out=False, revision=2)  # opted out once, opted in again since
TASK = TaskKey("consent_dag", "run-1", "opt_in")


def confirmed(rows: int) -> ConsentBatch:
    return ConsentBatch("cb-1", "optin", rows, "confirmed")


@pytest.mark.parametrize(
    ("known", "held", "kind", "lift", "stopped", "action", "called", "counts"),
    [
        # An earlier try's confirmed call stands, whatever else holds; the rows it left out stay out.
        (confirmed(3), {}, "optin", False, False, BatchAction.REUSE, [], (3, 0, 0)),
        (confirmed(2), {A: OUT}, "optin", False, False, BatchAction.REUSE, [], (2, 1, 0)),
        (confirmed(3), {}, "optin", False, True, BatchAction.REUSE, [], (3, 0, 0)),
        # A refused call is not confirmed: called again.
        (ConsentBatch("cb-1", "optout", 3, "refused", "8006"), {}, "optout", False, False, BatchAction.CALL,
         [A, B, C], (0, 0, 0)),
        # The calls stopped (a refused key): left for a later try, the list not read.
        (None, {A: OUT}, "optin", False, True, BatchAction.NOT_CONFIRMED, [], (0, 0, 3)),
        (None, {}, "optout", False, True, BatchAction.NOT_CONFIRMED, [], (0, 0, 3)),
        # An opt-out is called for every row, whatever the list holds.
        (None, {A: OUT}, "optout", False, False, BatchAction.CALL, [A, B, C], (0, 0, 0)),
        # An opt-in leaves out the numbers that opted out...
        (None, {}, "optin", False, False, BatchAction.CALL, [A, B, C], (0, 0, 0)),
        (None, {B: OUT}, "optin", False, False, BatchAction.CALL, [A, C], (0, 1, 0)),
        (None, {A: IN, B: OUT}, "optin", False, False, BatchAction.CALL, [A, C], (0, 1, 0)),
        (None, {A: OUT, B: OUT, C: OUT}, "optin", False, False, BatchAction.SKIP, [], (0, 3, 0)),
        # ...unless lift_opt_outs: a new consent given after the opt-out.
        (None, {A: OUT, B: OUT, C: OUT}, "optin", True, False, BatchAction.CALL, [A, B, C], (0, 0, 0)),
    ],
)  # fmt: skip
def test_what_the_store_holds_decides_the_batch(known, held, kind, lift, stopped, action, called, counts):
    asked = []

    def read_held() -> Mapping[str, Consent]:
        asked.append(True)
        return held

    decision = decide_batch(BATCH, known, read_held, kind=kind, lift_opt_outs=lift, stopped=stopped)
    assert decision.action is action
    assert [row.recipient for _, row in decision.rows] == called
    assert (decision.confirmed, decision.skipped_opted_out, decision.not_confirmed) == counts
    # The list is read only for an opt-in that goes on to the vendor, and what it held travels
    # with the decision: the opt-in is recorded only where the list still holds that.
    reads_list = kind == "optin" and action in (BatchAction.CALL, BatchAction.SKIP)
    assert bool(asked) == reads_list
    assert decision.held == (held if reads_list else {})


def test_a_reused_batch_counts_the_numbers_that_raced_its_call_as_opted_out():
    decision = decide_batch(BATCH, confirmed(3), dict, kind="optin", lift_opt_outs=False, stopped=False, raced=[B])
    assert decision.action is BatchAction.REUSE
    assert (decision.confirmed, decision.skipped_opted_out, list(decision.opted_out_during_call)) == (2, 0, [B])


@pytest.mark.parametrize(
    ("error", "failure"),
    [
        (PepipostApiError("8006", "bad source"), CallFailure.REFUSED),  # the rows' fault: refused again
        (PepipostApiError("8002", "not a WhatsApp number"), CallFailure.REFUSED),
        (PepipostApiError(None, "no such field", http_status=400), CallFailure.REFUSED),
        (PepipostApiError("8004", "bad key", http_status=401), CallFailure.STOP),  # every call would meet it
        (PepipostApiError(None, "forbidden", http_status=403), CallFailure.STOP),
        (PepipostApiError("8005", "busy"), CallFailure.RETRY),  # the vendor's mood: a later try
        (PepipostApiError(None, "throttled", http_status=429), CallFailure.RETRY),
        (PepipostApiError(None, "bad gateway", http_status=502), CallFailure.RETRY),
        (PepipostNotSentError("connection refused"), CallFailure.RETRY),
        (PepipostOutcomeUnknownError("read timed out"), CallFailure.RETRY),  # consent calls are idempotent
        (PepipostError("anything else"), CallFailure.RETRY),
    ],
)
def test_what_a_failed_call_means(error, failure):
    assert failure_of(error) is failure


def test_a_batch_is_named_by_its_task_kind_and_rows():
    rows = [row for _, row in BATCH]
    key = batch_key(TASK, "optin", rows)
    assert key == batch_key(TASK, "optin", list(rows))  # the same rows: the same call
    assert key.startswith("cb-")
    others = {
        batch_key(TASK, "optout", rows),
        batch_key(TaskKey(TASK.dag_id, TASK.run_id, TASK.task_id, 0), "optin", rows),
        batch_key(TASK, "optin", rows[:2]),
        batch_key(TASK, "optin", [*rows[:2], ConsentRow(C, "app")]),
    }
    assert key not in others and len(others) == 4


class FakeVendor:
    """The consent API: refuses a call of one of ``kinds`` that holds a number of ``refuses``
    (raising ``error``)."""

    def __init__(
        self,
        refuses: Iterable[str] = (),
        error: Exception | None = None,
        kinds: Iterable[str] = ("optin", "optout"),
    ) -> None:
        self.refuses, self.error = set(refuses), error or PepipostApiError("8006", "invalid recipient")
        self.kinds = set(kinds)
        self.calls: list[tuple[str, list[str]]] = []

    def manage_consent(self, kind: str, recipients: Sequence[ConsentRow]) -> object:
        numbers = [row.recipient for row in recipients]
        self.calls.append((kind, numbers))
        if kind in self.kinds and self.refuses & set(numbers):
            raise self.error
        return {"status": "success"}


class FakeStore:
    """The status store's consent side, in memory. ``stops`` are numbers that say STOP while
    their opt-in is with the vendor."""

    def __init__(self, opted_out: Iterable[str] = (), replies: Iterable[str] = (), stops: Iterable[str] = ()) -> None:
        self.list = {number: OUT for number in opted_out}
        self.replies, self.stops = list(replies), set(stops)
        self.batches: dict[str, ConsentBatch] = {}
        self.synced: list[str] = []

    def consent_batches(self, task: TaskKey) -> dict[str, ConsentBatch]:
        return dict(self.batches)

    def consents(self, recipients: Iterable[str]) -> dict[str, Consent]:
        return {number: self.list[number] for number in recipients if number in self.list}

    def record_consent_batch(
        self,
        task: TaskKey,
        batch: ConsentBatch,
        recipients: Sequence[str] = (),
        held: Mapping[str, Consent | None] | None = None,
    ) -> set[str]:
        self.batches[batch.batch_key] = batch
        raced = self.stops & set(recipients) if batch.state == "confirmed" and batch.kind == "optin" else set()
        for number in raced:  # as the real store does, in the batch's transaction
            self.list[number] = OUT
            self.batches[raced_key(batch.batch_key, number)] = ConsentBatch(
                raced_key(batch.batch_key, number), batch.kind, 1, RACED
            )
        return raced

    def suppressed(self, recipients: Iterable[str]) -> set[str]:
        return {number for number in recipients if number in self.list and self.list[number].opted_out}

    def reply_opt_outs(self, limit: int = 100_000) -> list[str]:
        return [number for number in self.replies if number not in self.synced][:limit]

    def mark_reply_opt_outs_synced(self, recipients: Sequence[str]) -> None:
        self.synced += recipients


def rows(*numbers: str) -> list[tuple[int, ConsentRow]]:
    return [(index, ConsentRow(number, "web")) for index, number in enumerate(numbers)]


def engine(vendor: FakeVendor, store: FakeStore, kind: str = "optin", **kwargs) -> ConsentEngine:
    return ConsentEngine(vendor, store, TASK, kind=kind, batch_size=2, max_workers=1, **kwargs)


def test_a_refused_batch_is_recorded_with_its_rows_masked_and_the_others_go_on():
    vendor, store = FakeVendor(refuses=[C]), FakeStore()
    tally, _ = engine(vendor, store).run(iter(rows(A, B, C, D)), 4)
    assert (tally.confirmed, tally.refused, tally.not_confirmed, tally.batches) == (2, 2, 0, 2)
    assert sorted(batch.state for batch in store.batches.values()) == ["confirmed", "refused"]
    assert [(r["row"], r["recipient"], r["error_code"]) for r in tally.failed_rows] == [
        (2, "9198******03", "8006"),
        (3, "9198******04", "8006"),
    ]


def test_a_refused_key_stops_the_calls_and_nothing_is_recorded():
    vendor, store = FakeVendor(refuses=[A], error=PepipostApiError("8004", "bad key", http_status=401)), FakeStore()
    tally, passed = engine(vendor, store).run(iter(rows(A, B, C, D)), 4)
    assert vendor.calls == [("optin", [A, B])]  # the second batch is not called
    assert (tally.confirmed, tally.refused, tally.not_confirmed) == (0, 0, 4)
    assert tally.stop is vendor.error and store.batches == {}
    assert passed.synced == []


def test_a_retry_does_not_call_again_for_a_confirmed_batch():
    store = FakeStore(opted_out=[B])
    first = engine(FakeVendor(refuses=[C], error=PepipostApiError("8005", "busy")), store).run(iter(rows(A, B, C)), 3)
    assert (first[0].confirmed, first[0].skipped_opted_out, first[0].not_confirmed) == (1, 1, 1)
    store.list.pop(B)  # B's STOP is lifted elsewhere: the confirmed batch is not re-cut for it
    vendor = FakeVendor()
    tally, _ = engine(vendor, store).run(iter(rows(A, B, C)), 3)
    assert vendor.calls == [("optin", [C])]
    assert (tally.confirmed, tally.skipped_opted_out, tally.batches_reused) == (2, 1, 1)


def test_an_opt_in_that_raced_a_stop_is_not_counted_and_its_opt_out_is_passed_on():
    vendor, store = FakeVendor(), FakeStore(stops=[B])
    tally, passed = engine(vendor, store).run(iter(rows(A, B)), 2)
    assert (tally.confirmed, tally.opted_out_during_call) == (1, [B])
    assert vendor.calls == [("optin", [A, B]), ("optout", [B])]
    assert passed.synced == [B]


def test_the_opt_outs_passed_on_isolate_the_number_the_vendor_refuses():
    vendor, store = FakeVendor(refuses=[C]), FakeStore(replies=[A, B, C, D, "98000"])
    _, passed = engine(vendor, store, kind="optout").run(iter([]), 0, sync_reply_opt_outs=True)
    assert passed.invalid == ["98000"]  # never sent: it would cost its batch
    assert [number for number, _ in passed.refused] == [C]
    assert sorted(passed.synced) == sorted(store.synced) == [A, B, D]
    assert passed.unsynced == 2


def test_a_retry_that_reuses_the_batch_passes_on_the_stop_that_raced_it():
    store = FakeStore(stops=[B])  # B says STOP while the opt-in of A and B is with the vendor
    first_vendor = FakeVendor(refuses=[B], error=PepipostOutcomeUnknownError("502"), kinds=["optout"])
    tally, passed = engine(first_vendor, store).run(iter(rows(A, B)), 2)
    assert (tally.confirmed, tally.opted_out_during_call, passed.left) == (1, [B], [B])
    (key,) = [key for key, batch in store.batches.items() if batch.state == "confirmed"]
    assert store.batches[raced_key(key, B)].state == RACED  # kept beside the batch
    vendor = FakeVendor()
    tally, passed = engine(vendor, store).run(iter(rows(A, B)), 2)
    assert vendor.calls == [("optout", [B])]  # the batch is reused; the raced STOP is passed on
    assert (tally.batches_reused, tally.confirmed, tally.opted_out_during_call) == (1, 1, [B])
    assert passed.synced == [B]


def test_a_raced_number_opted_in_again_since_is_counted_but_not_opted_out_at_the_vendor():
    store = FakeStore(stops=[B])
    engine(FakeVendor(refuses=[B], error=PepipostOutcomeUnknownError("502"), kinds=["optout"]), store).run(
        iter(rows(A, B)), 2
    )
    store.list[B] = IN  # a new consent, lifted elsewhere
    vendor = FakeVendor()
    tally, passed = engine(vendor, store).run(iter(rows(A, B)), 2)
    assert vendor.calls == [] and (tally.confirmed, tally.opted_out_during_call) == (1, [B])
    assert passed.synced == []


def test_an_unexpected_error_in_the_opt_out_pass_is_read_and_its_numbers_stay_unsynced():
    replies = [f"91980000{i:04d}" for i in range(7)]
    vendor, store = (
        FakeVendor(refuses=replies[2:4], error=RuntimeError("bug near 919800000002")),
        FakeStore(replies=replies),
    )
    _, passed = engine(vendor, store, kind="optout").run(iter([]), 0, sync_reply_opt_outs=True)
    assert isinstance(passed.unexpected, RuntimeError)
    assert passed.synced == store.synced == [*replies[:2], *replies[4:]]  # the others are marked passed on
    assert passed.left == replies[2:4] and passed.not_confirmed == 2
    assert len(passed.synced) + len(passed.refused) + passed.not_confirmed == len(replies)


def test_a_number_refused_after_a_split_is_not_counted_twice_when_its_half_raises():
    class SplitThenCrash(FakeVendor):
        def manage_consent(self, kind: str, recipients: Sequence[ConsentRow]) -> object:
            numbers = [row.recipient for row in recipients]
            self.calls.append((kind, numbers))
            if numbers == [A, B]:
                raise PepipostApiError("8006", "invalid recipient")
            if numbers == [A]:
                raise PepipostApiError("8006", "blocked")
            raise RuntimeError("crash")

    store = FakeStore(replies=[A, B])
    _, passed = engine(SplitThenCrash(), store, kind="optout").run(iter([]), 0, sync_reply_opt_outs=True)
    assert ([n for n, _ in passed.refused], passed.left, passed.refused_calls) == ([A], [B], 2)
    assert passed.unsynced == 2 and isinstance(passed.unexpected, RuntimeError)

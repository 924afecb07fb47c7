"""The campaign engine's per-row rule, as tables: what an earlier try recorded decides reuse,
fallback, claim or not sent; the ledger's answer to a claim decides send, suppressed, taken over
or duplicate. No store, no network: the edges are plain values."""

from __future__ import annotations

import pytest

from airflow_provider_pepipost.messages import MediaMessage
from airflow_provider_pepipost.operators.campaign import Action, CampaignSender, decide_row
from airflow_provider_pepipost.status.ledger import (
    HELD,
    RESENDABLE_STATES,
    SUPPRESSED,
    ClaimAnswer,
    LedgerEntry,
    TaskKey,
)
from airflow_provider_pepipost.template_messages import TemplateMessage

WITH_UNKNOWN = (*RESENDABLE_STATES, "unknown")


def entry(state: str, code: str | None = None, key: str = "k1") -> LedgerEntry:
    return LedgerEntry(key, key, "m1" if state == "accepted" else None, state, 0, code)


@pytest.mark.parametrize(
    ("earlier", "template", "has_fallback", "resendable", "stopped", "action", "of_template"),
    [
        (None, None, False, RESENDABLE_STATES, False, Action.CLAIM, False),  # a new row
        (None, None, False, RESENDABLE_STATES, True, Action.NOT_SENT, False),  # ...after the campaign stopped
        (entry("accepted"), None, False, RESENDABLE_STATES, False, Action.REUSE, False),  # sent before: not again
        (entry("accepted"), None, False, RESENDABLE_STATES, True, Action.REUSE, False),  # ...even when stopped
        (entry("unknown"), None, False, RESENDABLE_STATES, False, Action.REUSE, False),  # may have gone: never resent
        (entry("unknown"), None, False, WITH_UNKNOWN, False, Action.CLAIM, False),  # ...unless resend_unknown
        (entry("rejected", "8003"), None, False, RESENDABLE_STATES, False, Action.CLAIM, False),  # tried again
        (entry("not_sent"), None, False, RESENDABLE_STATES, False, Action.CLAIM, False),
        (entry("suppressed"), None, False, RESENDABLE_STATES, False, Action.CLAIM, False),  # the list read again
        (entry("rejected", "8007"), None, False, RESENDABLE_STATES, False, Action.CLAIM, False),  # no fallback set
        (entry("rejected", "8007"), None, True, RESENDABLE_STATES, False, Action.SEND_FALLBACK, False),
        (entry("rejected", "8007"), None, True, RESENDABLE_STATES, True, Action.NOT_SENT, False),
        (entry("rejected", "8007"), entry("accepted", key="t1"), True, RESENDABLE_STATES, False, Action.REUSE, True),
        (entry("rejected", "8007"), entry("unknown", key="t1"), True, RESENDABLE_STATES, False, Action.REUSE, True),
        (entry("rejected", "8007"), entry("rejected", "8006", "t1"), True, RESENDABLE_STATES, False,
         Action.SEND_FALLBACK, False),  # the template was refused: it is tried again
    ],
)  # fmt: skip
def test_what_an_earlier_try_recorded_decides_the_row(earlier, template, has_fallback, resendable, stopped, action,
                                                      of_template):  # fmt: skip
    asked = []

    def earlier_template():
        asked.append(True)
        return template

    decision = decide_row(earlier, earlier_template, has_fallback=has_fallback, resendable=resendable, stopped=stopped)
    assert (decision.action, decision.of_template) == (action, of_template)
    if decision.action is Action.REUSE:
        assert decision.entry is (template if of_template else earlier)
    # The template's entry is looked up only for a session message that met a closed window.
    assert bool(asked) == (has_fallback and earlier is not None and earlier.error_code == "8007")


def message() -> MediaMessage:
    template = TemplateMessage("919800000001", "src", "spring_offer", attributes=("Asha",))
    return MediaMessage("919800000001", "src", attachment_id="media-1", api_header="h1", fallback=template)


@pytest.mark.parametrize(
    ("answer", "state", "message_id"),
    [
        (SUPPRESSED, "suppressed", None),
        (HELD, "duplicate", None),
        (ClaimAnswer(False, taken_over=entry("accepted")), "accepted", "m1"),  # sent before a clear
        (ClaimAnswer(False, taken_over=entry("unknown")), "unknown", None),
    ],
)
def test_the_ledgers_answer_to_a_claim_decides_a_row_that_is_not_sent(answer, state, message_id):
    sender = CampaignSender(None, None, TaskKey("d", "r", "t"), total=1)  # no edge is reached
    outcome = sender._not_claimed(0, "k1", message(), answer)
    assert (outcome.state, outcome.message_id, outcome.key) == (state, message_id, "k1")

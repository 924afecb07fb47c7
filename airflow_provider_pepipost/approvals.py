"""Approvals answered on WhatsApp: which button stands for which option, and whose tap counts.

Pure code, no I/O. ``WhatsAppHITLNotifier`` sends the request with one quick-reply button per
option of Airflow's human-in-the-loop task; the receiver answers the task when an approver taps
one. What a request is (the task instance, the buttons' payloads, the approvers' numbers) is kept
in the status store, so nothing depends on the phone keeping context.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

from airflow_provider_pepipost import limits
from airflow_provider_pepipost.numbers import normalize_phone


class Verdict(str, Enum):
    """What a tap on an approval request does."""

    ANSWER = "answer"  # an approver chose an option: the task is answered with it
    NOT_AN_APPROVER = "not_an_approver"  # anyone else's tap changes nothing
    UNKNOWN_PAYLOAD = "unknown_payload"  # a button the request never had (or plain text)


@dataclass(frozen=True)
class Confirmation:
    """The approved template that tells an approver their answer was taken: its one attribute is the option."""

    template_name: str
    language: str
    pepipost_conn_id: str


@dataclass(frozen=True)
class ApprovalRequest:
    """One request message: the task instance it asks for, its buttons and who may answer."""

    message_id: str
    dag_id: str
    run_id: str
    task_id: str
    map_index: int
    try_number: int  # the try that asked: a tap on it never answers a later try
    options_by_payload: Mapping[str, str]  # button payload -> the task's option
    approvers: frozenset[str]  # canonical numbers
    confirmation: Confirmation | None = None  # what the approver is told once the answer is taken

    @property
    def task(self) -> tuple[str, str, str, int]:
        return (self.dag_id, self.run_id, self.task_id, self.map_index)

    def decide(self, sender: str | None, payload: str | None) -> tuple[Verdict, str | None]:
        """The verdict on a tap by ``sender`` (a canonical number) on button ``payload``, and the option."""
        if not sender or sender not in self.approvers:
            return Verdict.NOT_AN_APPROVER, None
        option = self.options_by_payload.get((payload or "").strip())
        if option is None:
            return Verdict.UNKNOWN_PAYLOAD, None
        return Verdict.ANSWER, option


def option_payloads(options: Sequence[str], given: Mapping[str, str] | None = None) -> dict[str, str]:
    """The button payload of each option: ``given[option]``, by default the option's own text.

    Raises ValueError naming the option when one has no payload, a payload is empty or too long,
    two options share one, or ``given`` names an option the task does not have.
    """
    given = dict(given or {})
    unknown = sorted(set(given) - set(options))
    if unknown:
        raise ValueError(f"option_payloads: {unknown} are not options of the task (its options: {list(options)})")
    payloads: dict[str, str] = {}
    for option in options:
        payload = given.get(option, option)
        if not isinstance(payload, str) or not payload.strip():
            raise ValueError(f"option_payloads[{option!r}]: {payload!r} is not a button payload")
        if len(payload) > limits.BUTTON_PAYLOAD_MAX:
            raise ValueError(f"option_payloads[{option!r}]: longer than {limits.BUTTON_PAYLOAD_MAX} characters")
        if payload.strip() in {p.strip() for p in payloads.values()}:
            raise ValueError(f"option_payloads[{option!r}]: {payload!r} is another option's payload too")
        payloads[option] = payload.strip()
    return payloads


def approver_numbers(recipients: str | Sequence[str]) -> frozenset[str]:
    """The approvers' canonical numbers; ValueError naming the one that is not a number."""
    numbers = [recipients] if isinstance(recipients, (str, int)) else list(recipients)
    found = set()
    for index, number in enumerate(numbers):
        try:
            found.add(normalize_phone(number))
        except ValueError as err:
            raise ValueError(f"recipients[{index}]: {err}") from None
    if not found:
        raise ValueError("recipients: is empty; name at least one approver's number")
    return frozenset(found)

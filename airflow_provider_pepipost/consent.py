"""Consent: the rows of an opt-in or opt-out through the vendor's consent API, and stop words.

The vendor's contract is in ``docs/pepipost/template-and-consent.md`` ("Consent"): a batch of
recipients, each with the number (10 to 15 digits), where the consent came from (``source``, at
most 25 characters, required), and optionally the ``user_agent`` and ``ip`` it came with.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from airflow_provider_pepipost import limits
from airflow_provider_pepipost.errors import RowProblem
from airflow_provider_pepipost.messages import mask_value
from airflow_provider_pepipost.numbers import normalize_phone

CONSENT_KINDS = ("optin", "optout")
SOURCE_MAX = 25  # the vendor's limit
USER_AGENT_MAX = 512
# Replies that opt a number out, compared without case, spaces, invisible characters or the
# punctuation around them.
DEFAULT_STOP_WORDS = ("STOP", "UNSUBSCRIBE", "STOP ALL")
_EDGE_PUNCTUATION = re.compile(r"^[\W_]+|[\W_]+$")


@dataclass(frozen=True)
class ConsentDefaults:
    """The operator-wide values a row's own values override."""

    source: str | None = None
    user_agent: str | None = None
    ip: str | None = None


@dataclass(frozen=True, slots=True)
class ConsentRow:
    """One recipient of a consent call, as the vendor takes it."""

    recipient: str
    source: str
    user_agent: str | None = None
    ip: str | None = None

    def to_payload(self) -> dict[str, str]:
        payload = {"recipient": self.recipient, "source": self.source}
        if self.user_agent:
            payload["user_agent"] = self.user_agent
        if self.ip:
            payload["ip"] = self.ip
        return payload


def consent_body(kind: str, rows: Iterable[ConsentRow]) -> dict[str, Any]:
    """The whole body of ``POST /api/v2/consent/manage/``."""
    if kind not in CONSENT_KINDS:
        raise ValueError(f"kind must be one of {CONSENT_KINDS}, not {kind!r}")
    return {"type": kind, "recipients": [row.to_payload() for row in rows]}


def build_consent_row(item: Any, defaults: ConsentDefaults, row: int) -> tuple[ConsentRow | None, list[RowProblem]]:
    """Validate one input row against the vendor's rules; return the consent row or every problem.

    A row is a phone number, or a dict with ``recipient`` (or the send operators'
    ``recipient_whatsapp``) and optional ``source`` (or ``consent_source``), ``user_agent``, ``ip``.
    """
    problems: list[RowProblem] = []

    def problem(field: str, value: Any, reason: str) -> None:
        problems.append(RowProblem(row, field, mask_value(field, value), reason))

    if isinstance(item, bool) or not isinstance(item, (Mapping, str, int)):
        problem("row", item, "must be a phone number or a dict with 'recipient'")
        return None, problems
    data: Mapping[str, Any] = item if isinstance(item, Mapping) else {"recipient": item}
    field = "recipient" if "recipient" in data or "recipient_whatsapp" not in data else "recipient_whatsapp"
    raw = data.get(field)
    recipient = ""
    if raw is None or raw == "":
        problem(field, raw, "is required")
    else:
        try:
            recipient = normalize_phone(raw)
        except ValueError as err:
            problem(field, raw, str(err))

    # A file shared with the send operators, whose 'source' is the WhatsApp source id, names the
    # consent's own source 'consent_source'.
    source_field = "consent_source" if data.get("consent_source") not in (None, "") else "source"
    source = _given(data, source_field, defaults.source)
    if not isinstance(source, str) or not source.strip():
        problem(source_field, source, "is required by the vendor: where the consent came from (e.g. 'WEB_SIGNUP')")
    elif len(source.strip()) > SOURCE_MAX:
        problem(source_field, source, f"is {len(source.strip())} characters; the vendor takes at most {SOURCE_MAX}")
    elif reason := limits.text_problem(source):
        problem(source_field, source, reason)

    user_agent = _given(data, "user_agent", defaults.user_agent)
    if user_agent is not None:
        if not isinstance(user_agent, str):
            problem("user_agent", user_agent, "must be a string")
        elif len(user_agent) > USER_AGENT_MAX:
            problem("user_agent", user_agent, f"is {len(user_agent)} characters; at most {USER_AGENT_MAX}")
        elif reason := limits.text_problem(user_agent):
            problem("user_agent", user_agent, reason)

    ip = _given(data, "ip", defaults.ip)
    if ip is not None:
        try:
            ip = str(ipaddress.ip_address(str(ip).strip()))
        except ValueError:
            problem("ip", ip, "is not a valid IPv4 or IPv6 address")

    if problems:
        return None, problems
    return ConsentRow(recipient, source.strip(), user_agent or None, ip or None), []


def _given(data: Mapping[str, Any], key: str, default: Any) -> Any:
    value = data.get(key)
    return default if value is None or value == "" else value


def normalize_reply(text: str) -> str:
    """A reply as stop words are compared: upper case, no spaces, no punctuation around it, and
    no format characters (Unicode category Cf: zero-width spaces and joiners, soft hyphens, word
    joiners, direction marks), which a phone's keyboard or a copied text can put inside a word."""
    visible = "".join(char for char in unicodedata.normalize("NFKC", text) if unicodedata.category(char) != "Cf")
    return _EDGE_PUNCTUATION.sub("", "".join(visible.upper().split()))


def stop_word_set(words: Iterable[str] | str | None = None) -> frozenset[str]:
    """The normalized stop words; a string is a comma-separated list; None gives the defaults."""
    if words is None:
        words = DEFAULT_STOP_WORDS
    elif isinstance(words, str):
        words = words.split(",")
    found = frozenset(normalize_reply(word) for word in words if word and word.strip())
    if not found:
        raise ValueError("stop words: the list is empty; leave it unset for the defaults")
    return found


def is_stop_reply(text: Any, stop_words: frozenset[str]) -> bool:
    """True when a text reply is one of the stop words (and nothing else)."""
    return isinstance(text, str) and len(text) <= 200 and normalize_reply(text) in stop_words

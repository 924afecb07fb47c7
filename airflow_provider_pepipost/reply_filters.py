"""Which customer messages a reply trigger or sensor wants, and the small event it fires for one.

Pure code, no I/O. Filters combine with AND; an unset filter lets everything through. Keywords are
compared as stop words are (``consent.normalize_reply``: case, spaces, punctuation around the
word, invisible characters), against a text reply's words, a button's text or a media's caption.
The event holds no whole number and no free text from the phone: ids, the kind, the button's
approved payload, the keyword (the filter's own word) and the masked number. A task that needs
the rest reads it from the status store (``StatusStore.reply``).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from airflow_provider_pepipost.consent import normalize_reply
from airflow_provider_pepipost.numbers import mask_number
from airflow_provider_pepipost.status.model import share_of
from airflow_provider_pepipost.status.replies import Reply

# The kinds the receiver reads into columns; others (a kind the vendor adds later) are kept as sent.
KNOWN_KINDS = ("text", "button", "image", "audio", "video", "document", "sticker", "location", "unknown")


@dataclass(frozen=True)
class ReplyFilter:
    """What a reply must be to count. Every field None or empty: every reply counts."""

    kinds: tuple[str, ...] = ()
    button_payloads: tuple[str, ...] = ()
    keywords: tuple[str, ...] = ()
    dag_id: str | None = None  # of the send task the reply answers
    task_id: str | None = None

    @classmethod
    def build(
        cls,
        kinds: Iterable[str] | str | None = None,
        button_payloads: Iterable[str] | str | None = None,
        keywords: Iterable[str] | str | None = None,
        dag_id: str | None = None,
        task_id: str | None = None,
    ) -> ReplyFilter:
        """A filter from what a user wrote; raises ValueError naming the field that is wrong."""
        built = cls(
            kinds=tuple(kind.strip().lower() for kind in _listed("kinds", kinds)),
            button_payloads=tuple(payload.strip() for payload in _listed("button_payloads", button_payloads)),
            keywords=tuple(_listed("keywords", keywords)),
            dag_id=dag_id,
            task_id=task_id,
        )
        if any(not normalize_reply(word) for word in built.keywords):
            raise ValueError(f"keywords: {list(built.keywords)!r} holds one that is only spaces or punctuation")
        for kind in built.kinds:
            _check_kind(kind)
        for field, value in (("dag_id", dag_id), ("task_id", task_id)):
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"{field}: {value!r} is not an id; leave it unset to take replies to any {field[:-3]}")
        return built

    def match(self, reply: Reply) -> tuple[bool, str | None]:
        """Whether the reply counts, and which keyword it matched (None without keywords)."""
        if self.kinds and reply.kind not in self.kinds:
            return False, None
        if self.button_payloads and reply.button_payload not in self.button_payloads:
            return False, None
        answered = reply.in_reply_to
        if self.dag_id and (answered is None or answered.dag_id != self.dag_id):
            return False, None
        if self.task_id and (answered is None or answered.task_id != self.task_id):
            return False, None
        if not self.keywords:
            return True, None
        said = normalize_reply(reply.text) if reply.text else ""
        for word in self.keywords:
            if said and normalize_reply(word) == said:
                return True, word
        return False, None

    def to_kwargs(self) -> dict[str, Any]:
        """The filter as JSON-able trigger arguments."""
        return {
            "kinds": list(self.kinds),
            "button_payloads": list(self.button_payloads),
            "keywords": list(self.keywords),
            "dag_id": self.dag_id,
            "task_id": self.task_id,
        }


def _check_kind(kind: str) -> None:
    """A kind the receiver does not read is allowed (the vendor may add kinds); a misspelt one is not."""
    if kind in KNOWN_KINDS:
        return
    close = difflib.get_close_matches(kind, KNOWN_KINDS, n=1, cutoff=0.75)
    if close:
        raise ValueError(f"kinds: {kind!r} is not a kind; did you mean {close[0]!r}? Kinds: {list(KNOWN_KINDS)}")


def _listed(field: str, value: Iterable[str] | str | None) -> list[str]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"{field}: {item!r} is not a non-empty string")
    return items


def reply_event(reply: Reply, keyword: str | None) -> dict[str, Any]:
    """The payload of the event fired for one reply: small, JSON, no whole number, no free text."""
    answered = reply.in_reply_to
    return {
        "inbound_id": reply.inbound_id,
        "kind": reply.kind,
        "button_payload": reply.button_payload,
        "keyword": keyword,
        "received_at": datetime.fromtimestamp(reply.received_at, tz=timezone.utc).isoformat(),
        "from_masked": mask_number(reply.sender),
        "in_reply_to": None
        if answered is None
        else {
            "message_id": answered.message_id,
            "dag_id": answered.dag_id,
            "run_id": answered.run_id,
            "task_id": answered.task_id,
            "map_index": answered.map_index,
            "row": answered.row,
        },
    }


@dataclass(frozen=True)
class ReplyTally:
    """What the replies to a set of messages add up to, against a reply sensor's condition."""

    recipients: int  # messages waited on (one per recipient)
    repliers: int  # of those, answered by at least one matching reply
    inbound_ids: tuple[int, ...]  # the matching replies, oldest first
    needed: int  # repliers the condition asks for

    @property
    def done(self) -> bool:
        return self.repliers >= self.needed

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipients": self.recipients,
            "repliers": self.repliers,
            "needed": self.needed,
            "inbound_ids": list(self.inbound_ids),
        }


def needed_repliers(recipients: int, min_replies: int | None, min_ratio: float | None) -> int:
    """How many recipients must have replied: ``min_replies``, or ``min_ratio`` of them rounded up."""
    if min_replies is not None:
        return min_replies
    ratio = 1.0 if min_ratio is None else min_ratio
    return max(1, share_of(recipients, ratio))


def tally(replies: Iterable[Reply], recipients: int, needed: int, reply_filter: ReplyFilter) -> ReplyTally:
    """Count the recipients whose reply matches; a recipient who replied twice counts once."""
    matching = [reply for reply in replies if reply_filter.match(reply)[0]]
    answered = {reply.in_reply_to.message_id for reply in matching if reply.in_reply_to is not None}
    return ReplyTally(recipients, len(answered), tuple(reply.inbound_id for reply in matching), needed)

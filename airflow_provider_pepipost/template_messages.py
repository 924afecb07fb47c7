"""The vendor contract for one WhatsApp template message: validate a row, build its JSON.

Pure code, no I/O and no Airflow, like ``messages`` (whose row rules for the recipient, source and
x-apiheader it shares): the rules of docs/pepipost/template-and-consent.md in one place. A
template message is the only kind WhatsApp delivers to someone who has not written to the
business in the last 24 hours.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from airflow_provider_pepipost import limits
from airflow_provider_pepipost.errors import RowProblem
from airflow_provider_pepipost.messages import ProblemSink, read_row, render_placeholders
from airflow_provider_pepipost.outgoing import OutgoingMessage

HEADER_TYPES = frozenset({"document", "image", "video"})
LANGUAGE_POLICIES = frozenset({"deterministic", "fallback"})
MAX_ATTRIBUTE_LENGTH = 1024  # a template variable is text like a caption; longer is refused later

# What a template message takes beyond its addressing: the template operator's parameter names,
# which a media operator's fallback_template holds too.
TEMPLATE_OPTIONS = ("template_name", "language", "language_policy", "attributes", "media_url", "media_type", "ttl")
# Keys of a row dict that are template fields; every other key is row data for placeholders.
ROW_FIELDS = ("recipient_whatsapp", "recipient_type", "source", "x-apiheader", *TEMPLATE_OPTIONS)


@dataclass(frozen=True, slots=True)
class TemplateDefaults:
    """Operator-wide values; a row's own value wins over each of them."""

    source: str | None = None
    template_name: str | None = None
    language: str = "en"
    language_policy: str | None = None
    attributes: Sequence[str] | None = None  # may hold {field} placeholders filled from each row
    media_url: str | None = None
    media_type: str | None = None
    ttl: int | None = None
    recipient_type: str = "individual"
    x_apiheader: str | None = None


@dataclass(frozen=True, slots=True)
class TemplateMessage:
    """One validated template message, ready to be sent."""

    recipient_whatsapp: str
    source: str
    template_name: str
    language: str = "en"
    language_policy: str | None = None
    attributes: tuple[str, ...] = ()
    media_url: str | None = None
    media_type: str | None = None
    ttl: int | None = None
    recipient_type: str = "individual"
    api_header: str | None = None

    @property
    def recipient(self) -> str:
        return self.recipient_whatsapp

    @property
    def fallback(self) -> None:
        """A template reaches a closed window itself: it has no fallback."""
        return None

    def with_header(self, api_header: str) -> TemplateMessage:
        return dataclasses.replace(self, api_header=api_header)

    def with_fallback(self, fallback: OutgoingMessage | None) -> TemplateMessage:
        if fallback is not None:
            raise ValueError("a template message reaches a closed window itself: it takes no fallback")
        return self

    def identity(self) -> str:
        """Everything the recipient would see, as one string for the idempotency key."""
        parts = (
            "template",
            self.recipient_type,
            self.source,
            self.template_name,
            self.language,
            *self.attributes,
            f"{self.media_type or ''}:{self.media_url or ''}",
        )
        return "\x1f".join(parts)

    def to_payload(self) -> dict[str, Any]:
        """One element of the request's ``message`` list, field for field as the vendor page shows."""
        language: dict[str, str] = {"locale": self.language}
        if self.language_policy is not None:
            language["policy"] = self.language_policy
        template: dict[str, Any] = {"name": self.template_name}
        if self.attributes:
            template["attributes"] = list(self.attributes)
        template["language"] = language
        payload: dict[str, Any] = {
            "recipient_whatsapp": self.recipient_whatsapp,
            "message_type": "template",
            "recipient_type": self.recipient_type,
            "source": self.source,
        }
        if self.api_header is not None:
            payload["x-apiheader"] = self.api_header
        if self.ttl is not None:
            payload["ttl"] = self.ttl
        payload["type_template"] = [template]
        if self.media_url is not None:
            payload["type_media_template"] = {"type": self.media_type, "url": self.media_url}
        return payload


def _given(data: Mapping[str, Any], key: str, default: Any) -> Any:
    value = data.get(key)
    return default if value is None or value == "" else value


def build_template_message(
    item: Any, defaults: TemplateDefaults, row: int
) -> tuple[TemplateMessage | None, list[RowProblem]]:
    """Validate one input row as a template message; return the message or every problem found."""
    data, problems, problem, addressing = read_row(item, defaults, row)
    if data is None:
        return None, problems
    name = _given(data, "template_name", defaults.template_name)
    if not isinstance(name, str) or not name.strip():
        problem("template_name", name, "is required: the name of an approved template")
    language = _given(data, "language", defaults.language)
    if not isinstance(language, str) or not language.strip():
        problem("language", language, "must be the template's approved locale, such as 'en' or 'pt_BR'")
    policy = _given(data, "language_policy", defaults.language_policy)
    if policy is not None and policy not in LANGUAGE_POLICIES:
        problem("language_policy", policy, f"must be one of {sorted(LANGUAGE_POLICIES)}")
    attributes = _check_attributes(data, defaults, problem)
    media_url, media_type = _check_header(data, defaults, problem)
    ttl = _check_ttl(data, defaults, problem)
    if problems or addressing is None:
        return None, problems
    return (
        TemplateMessage(
            recipient_whatsapp=addressing.recipient,
            source=addressing.source,
            template_name=name.strip(),
            language=language.strip(),
            language_policy=policy,
            attributes=tuple(attributes),
            media_url=media_url,
            media_type=media_type,
            ttl=ttl,
            recipient_type=addressing.recipient_type,
            api_header=addressing.api_header,
        ),
        [],
    )


def _check_attributes(data: Mapping[str, Any], defaults: TemplateDefaults, problem: ProblemSink) -> list[str]:
    """The template's variables in order, placeholders filled from the row; each problem reported."""
    attributes: list[str] = []
    raw_attributes = _given(data, "attributes", defaults.attributes) or []
    if isinstance(raw_attributes, str) or not isinstance(raw_attributes, Sequence):
        problem("attributes", raw_attributes, "must be a list of strings, in the template's order")
        return attributes
    for position, value in enumerate(raw_attributes):
        field = f"attributes[{position}]"
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            problem(field, value, "must be a string")
            continue
        try:
            text = render_placeholders(str(value), data)
        except ValueError as err:
            problem(field, value, str(err))
            continue
        if not text.strip():
            problem(field, value, "is empty: WhatsApp refuses a template variable without text")
        elif len(text) > MAX_ATTRIBUTE_LENGTH:
            problem(field, value, f"is {len(text)} characters; at most {MAX_ATTRIBUTE_LENGTH}")
        elif reason := limits.text_problem(text):
            problem(field, value, reason)
        else:
            attributes.append(text)
    return attributes


def _check_header(data: Mapping[str, Any], defaults: TemplateDefaults, problem: ProblemSink) -> tuple[Any, Any]:
    """The media header (URL and type), both or neither; each problem reported."""
    media_url = _given(data, "media_url", defaults.media_url)
    media_type = _given(data, "media_type", defaults.media_type)
    if media_url is not None or media_type is not None:
        if not isinstance(media_url, str) or not media_url.startswith(("https://", "http://")):
            problem("media_url", media_url, "must be an http(s) URL for a media header")
        if media_type not in HEADER_TYPES:
            problem("media_type", media_type, f"must be one of {sorted(HEADER_TYPES)} for a media header")
    return media_url, media_type


def _check_ttl(data: Mapping[str, Any], defaults: TemplateDefaults, problem: ProblemSink) -> Any:
    """Whole days the vendor may take to process the message, or None; a problem reported."""
    ttl = _given(data, "ttl", defaults.ttl)
    if ttl is None:
        return None
    try:
        whole = int(ttl)
    except (TypeError, ValueError):
        whole = None
    if whole is None or isinstance(ttl, bool) or whole != float(ttl) or whole < 1:
        problem("ttl", ttl, "must be a whole number of days, at least 1")
        return ttl
    return whole

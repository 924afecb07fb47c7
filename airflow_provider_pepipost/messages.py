"""The vendor contract for one WhatsApp media message: validate a row, build its JSON.

Pure code, no I/O and no Airflow: the rules of docs/pepipost/send-media-message.md in one
place, so that they can be tested on their own and applied to every row before the first send.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import string
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from airflow_provider_pepipost import limits
from airflow_provider_pepipost.errors import MessageValidationError, RowProblem

# The number rules live in ``numbers``; these names stay importable from here, where they were.
from airflow_provider_pepipost.numbers import MAX_PHONE_DIGITS as MAX_PHONE_DIGITS
from airflow_provider_pepipost.numbers import MIN_PHONE_DIGITS as MIN_PHONE_DIGITS
from airflow_provider_pepipost.numbers import mask_number, normalize_phone
from airflow_provider_pepipost.outgoing import OutgoingMessage
from airflow_provider_pepipost.outgoing import request_body as request_body  # its home before outgoing

RECIPIENT_TYPES = frozenset({"individual", "group"})
ATTACHMENT_TYPES = frozenset({"image", "video", "audio", "document", "sticker"})
# WhatsApp's own limit for a media caption; the vendor page gives none, a longer one fails later.
MAX_CAPTION_LENGTH = 1024
MAX_GROUP_ID_LENGTH = limits.RECIPIENT_MAX  # what the ledger's recipient column holds

# Keys of a row dict that are message fields; every other key is row data for caption placeholders.
ROW_FIELDS = (
    "recipient_whatsapp",
    "recipient_type",
    "attachment_id",
    "attachment_url",
    "attachment_type",
    "caption",
    "source",
    "x-apiheader",
)

# Where a row builder reports a problem: (field, the value as given, the reason).
ProblemSink = Callable[[str, Any, str], None]
Built = TypeVar("Built")
# A builder of rows of any kind (a message, a consent row): (item, defaults, row) -> (built or None, problems).
Builder = Callable[[Any, Any, int], tuple[Built | None, list[RowProblem]]]


class AddressDefaults(Protocol):
    """The operator-wide values every message kind's defaults carry for the shared row fields."""

    @property
    def source(self) -> str | None: ...
    @property
    def recipient_type(self) -> str: ...
    @property
    def x_apiheader(self) -> str | None: ...


_GROUP_ID = re.compile(r"^[A-Za-z0-9@._:\-]+$")
_FORMATTER = string.Formatter()


@dataclass(frozen=True, slots=True)
class MessageDefaults:
    """Operator-wide values; a row's own value wins over each of them."""

    source: str | None = None
    attachment_id: str | None = None
    attachment_url: str | None = None
    attachment_type: str | None = None
    caption: str | None = None
    recipient_type: str = "individual"
    x_apiheader: str | None = None


@dataclass(frozen=True, slots=True)
class MediaMessage:
    """One validated media message, ready to be sent."""

    recipient_whatsapp: str
    source: str
    recipient_type: str = "individual"
    attachment_id: str | None = None
    attachment_url: str | None = None
    attachment_type: str | None = None
    caption: str | None = None
    api_header: str | None = None
    # The template message to send instead when the vendor answers 8007 (the 24-hour window is
    # closed): not part of this message's body or identity.
    fallback: OutgoingMessage | None = None

    @property
    def recipient(self) -> str:
        return self.recipient_whatsapp

    def identity(self) -> str:
        """Everything the recipient would see, as one string for the idempotency key."""
        parts = (
            self.recipient_type,
            self.source,
            self.attachment_id or "",
            self.attachment_url or "",
            self.attachment_type or "",
            "" if self.caption is None else "c:" + self.caption,
        )
        return "\x1f".join(parts)

    def to_payload(self) -> dict[str, Any]:
        """One element of the request's ``message`` list, field for field as the vendor page shows."""
        if self.attachment_id is not None:
            attachment: dict[str, str] = {"attachment_id": self.attachment_id}
        else:
            attachment = {"attachment_url": self.attachment_url or "", "attachment_type": self.attachment_type or ""}
        if self.caption is not None:
            attachment["caption"] = self.caption
        payload: dict[str, Any] = {
            "recipient_whatsapp": self.recipient_whatsapp,
            "message_type": "media",
            "recipient_type": self.recipient_type,
            "source": self.source,
        }
        if self.api_header is not None:
            payload["x-apiheader"] = self.api_header
        payload["type_media"] = [{"attachments": [attachment]}]
        return payload

    def with_header(self, api_header: str) -> MediaMessage:
        return dataclasses.replace(self, api_header=api_header)

    def with_fallback(self, fallback: OutgoingMessage | None) -> MediaMessage:
        return dataclasses.replace(self, fallback=fallback)


def default_campaign_key(dag_id: str, run_id: str, task_id: str) -> str:
    """The campaign a send task belongs to unless the user names one: the task, in its run.

    Not the map index: a clear whose upstream hands the rows out in another order (a file
    listing, an unordered query) must find each row's message wherever an earlier map index sent it.
    """
    return f"{dag_id}/{run_id}/{task_id}"


def legacy_campaign_key(dag_id: str, run_id: str, task_id: str, map_index: int) -> str:
    """The default campaign key of status stores before schema 7, which named the map index: a
    retry after an upgrade still finds what the try before the upgrade sent."""
    return f"{dag_id}/{run_id}/{task_id}/{map_index}"


def idempotency_key(campaign: str, recipient: str, content: str) -> str:
    """The stable identity of one message of one campaign.

    ``content`` is everything the recipient would see (``MediaMessage.identity()``): two rows that
    differ in any of it are two messages. The same inputs give the same key in every try, so a
    retry finds what the earlier try sent. It is also the default ``x-apiheader``, which delivery
    reports echo.
    """
    raw = "\x1f".join((campaign, recipient, content))
    return DERIVED_HEADER_PREFIX + hashlib.sha256(raw.encode()).hexdigest()[:32]


DERIVED_HEADER_PREFIX = "af-"
_DERIVED_HEADER = re.compile(r"^af-[0-9a-f]{32}$")


def is_derived_header(header: str | None) -> bool:
    """True for an x-apiheader ``idempotency_key`` made (a hash: no number in it, whatever its digits)."""
    return header is not None and _DERIVED_HEADER.match(header) is not None


def mask_value(field: str, value: Any) -> str:
    """A value as shown in an error: phone numbers half hidden, long values cut."""
    text = repr(value)
    if field in ("recipient_whatsapp", "recipient") and isinstance(value, (str, int)) and len(str(value)) > 6:
        text = repr(mask_number(str(value)))
    return text if len(text) <= 60 else text[:57] + "..."


def _text(row: Mapping[str, Any], key: str, default: str | None) -> Any:
    value = row.get(key)
    return default if value is None or value == "" else value


def render_placeholders(template: str, row: Mapping[str, Any]) -> str:
    """Fill ``{field}`` placeholders from the row. Only plain names: no attribute or index access."""
    if "{" not in template and "}" not in template:
        return template
    values = []
    for literal, name, spec, conversion in _FORMATTER.parse(template):
        values.append(literal)
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ValueError(f"placeholder {{{name}}} is not a plain {{field_name}}")
        if row.get(name) is None:
            raise ValueError(f"placeholder {{{name}}} has no value in this row")
        values.append(str(row[name]))
    return "".join(values)


def as_row(item: Any) -> Mapping[str, Any]:
    """A recipient item as a row dict: a bare phone number becomes ``{"recipient_whatsapp": ...}``."""
    if isinstance(item, Mapping):
        if "x_apiheader" in item and "x-apiheader" not in item:
            item = {**item, "x-apiheader": item["x_apiheader"]}
        return item
    return {"recipient_whatsapp": item}


@dataclass(frozen=True, slots=True)
class Addressing:
    """What every message kind takes from a row the same way: who gets it, from which source."""

    recipient: str
    recipient_type: str
    source: str
    api_header: str | None


def check_addressing(data: Mapping[str, Any], defaults: AddressDefaults, problem: ProblemSink) -> Addressing | None:
    """Validate the fields all message kinds share; report each problem through ``problem``.

    ``defaults`` has ``recipient_type``, ``source`` and ``x_apiheader``. Returns None when a
    problem was reported.
    """
    reported = False

    def bad(field: str, value: Any, reason: str) -> None:
        nonlocal reported
        reported = True
        problem(field, value, reason)

    recipient_type = _text(data, "recipient_type", defaults.recipient_type)
    if recipient_type not in RECIPIENT_TYPES:
        bad("recipient_type", recipient_type, f"must be one of {sorted(RECIPIENT_TYPES)}")

    raw_recipient = data.get("recipient_whatsapp")
    recipient = ""
    if raw_recipient is None or raw_recipient == "":
        bad("recipient_whatsapp", raw_recipient, "is required")
    elif recipient_type == "group":
        recipient = str(raw_recipient).strip()
        if not _GROUP_ID.match(recipient) or len(recipient) > MAX_GROUP_ID_LENGTH:
            bad("recipient_whatsapp", raw_recipient, "is not a valid group id")
    else:
        try:
            recipient = normalize_phone(raw_recipient)
        except ValueError as err:
            bad("recipient_whatsapp", raw_recipient, str(err))

    source = _text(data, "source", defaults.source)
    if not isinstance(source, str) or not source.strip():
        bad("source", source, "is required: set it on the row, the operator or the connection extra 'source'")

    header = _text(data, "x-apiheader", defaults.x_apiheader)
    if header is not None:
        if not isinstance(header, str):
            bad("x-apiheader", header, "must be a string")
        elif len(header) > limits.API_HEADER_MAX:
            bad("x-apiheader", header, f"is {len(header)} characters; at most {limits.API_HEADER_MAX}")
        elif reason := limits.text_problem(header):
            bad("x-apiheader", header, reason)
    if reported:
        return None
    return Addressing(recipient, recipient_type, source.strip(), header)


def read_row(
    item: Any, defaults: AddressDefaults, row: int
) -> tuple[Mapping[str, Any] | None, list[RowProblem], ProblemSink, Addressing | None]:
    """The start every message kind's builder shares: the row as a dict, its shared fields checked.

    Returns (row dict or None when the item is no row at all, the problem list, the function that
    adds a problem to it, the ``Addressing`` or None).
    """
    problems: list[RowProblem] = []

    def problem(field: str, value: Any, reason: str) -> None:
        problems.append(RowProblem(row, field, mask_value(field, value), reason))

    if not isinstance(item, (Mapping, str, int)) or isinstance(item, bool):
        problem("row", item, "must be a phone number or a dict with 'recipient_whatsapp'")
        return None, problems, problem, None
    data = as_row(item)
    return data, problems, problem, check_addressing(data, defaults, problem)


def build_message(item: Any, defaults: MessageDefaults, row: int) -> tuple[MediaMessage | None, list[RowProblem]]:
    """Validate one input row against the vendor's rules; return the message or every problem found.

    ``api_header`` stays None when neither the row nor the defaults give one; the caller derives it.
    """
    data, problems, problem, addressing = read_row(item, defaults, row)
    if data is None:
        return None, problems
    attachment_id, attachment_url, attachment_type = _check_attachment(data, defaults, problem)
    caption = _check_caption(data, defaults, problem)
    if problems or addressing is None:
        return None, problems
    return (
        MediaMessage(
            recipient_whatsapp=addressing.recipient,
            source=addressing.source,
            recipient_type=addressing.recipient_type,
            attachment_id=attachment_id.strip() if attachment_id else None,
            attachment_url=None if attachment_id else attachment_url,
            attachment_type=None if attachment_id else attachment_type,
            caption=caption,
            api_header=addressing.api_header,
        ),
        [],
    )


def _check_attachment(data: Mapping[str, Any], defaults: MessageDefaults, problem: ProblemSink) -> tuple[Any, Any, Any]:
    """The row's media (id, or URL and type), each problem reported; a row's own attachment
    replaces the defaults' attachment as a whole."""
    if data.get("attachment_id") or data.get("attachment_url"):
        attachment_id, attachment_url = data.get("attachment_id"), data.get("attachment_url")
        attachment_type = data.get("attachment_type")
    else:
        attachment_id, attachment_url = defaults.attachment_id, defaults.attachment_url
        attachment_type = defaults.attachment_type
    attachment_type = attachment_type or None
    if attachment_id and attachment_url:
        problem("attachment_id", attachment_id, "give attachment_id or attachment_url, not both")
    elif attachment_id:
        if not isinstance(attachment_id, str) or not attachment_id.strip():
            problem("attachment_id", attachment_id, "must be a non-empty media id string")
    elif attachment_url:
        if not isinstance(attachment_url, str) or not attachment_url.startswith(("https://", "http://")):
            problem("attachment_url", attachment_url, "must be an http(s) URL")
        if attachment_type not in ATTACHMENT_TYPES:
            problem(
                "attachment_type", attachment_type, f"must be one of {sorted(ATTACHMENT_TYPES)} with attachment_url"
            )
    else:
        problem("attachment_id", None, "is required: give attachment_id, or attachment_url with attachment_type")
    return attachment_id, attachment_url, attachment_type


def _check_caption(data: Mapping[str, Any], defaults: MessageDefaults, problem: ProblemSink) -> str | None:
    """The row's caption with its placeholders filled, or None; each problem reported."""
    caption = _text(data, "caption", defaults.caption)
    if caption is None:
        return None
    if not isinstance(caption, str):
        problem("caption", caption, "must be a string")
        return None
    try:
        text = render_placeholders(caption, data)
    except ValueError as err:
        problem("caption", caption, str(err))
        return caption
    if len(text) > MAX_CAPTION_LENGTH:
        problem("caption", text, f"is {len(text)} characters; at most {MAX_CAPTION_LENGTH}")
    elif reason := limits.text_problem(text):
        problem("caption", text, reason)
    return text


def validate_rows(items: Iterable[Any], defaults: Any, build: Builder[Any] | None = None) -> int:
    """Check every row; return how many there are, or raise one error listing all problems.

    ``build(item, defaults, row)`` is the message kind's builder (default: media). Streams: memory
    holds the first problems shown in the error, not the rows.
    """
    build = build or build_message
    shown: list[RowProblem] = []
    total_problems = 0
    count = 0
    for index, item in enumerate(items):
        count += 1
        _, problems = build(item, defaults, index)
        line = getattr(items, "line", None)  # an audience read from a file: name the row's line too
        if problems and line is not None:
            problems = [dataclasses.replace(p, line=line) for p in problems]
        total_problems += len(problems)
        room = MessageValidationError.SHOWN - len(shown)
        if room > 0:
            shown.extend(problems[:room])
    if total_problems:
        raise MessageValidationError(shown, total_problems)
    return count


def build_all(items: Iterable[Any], defaults: Any, build: Builder[Built]) -> list[Built]:
    """Every item built with ``build(item, defaults, row)``, or one error naming every problem.

    For the few items a single call takes (a consent batch, a notifier's numbers); campaigns
    stream with ``validate_rows`` and ``iter_messages`` instead.
    """
    built: list[Built] = []
    problems: list[RowProblem] = []
    for index, item in enumerate(items):
        message, found = build(item, defaults, index)
        problems += found
        if message is not None:
            built.append(message)
    if problems:
        raise MessageValidationError(problems[: MessageValidationError.SHOWN], len(problems))
    return built


def iter_messages(items: Iterable[Any], defaults: Any, build: Builder[Built]) -> Iterator[tuple[int, Built]]:
    """Build each row's message (or row of any kind); rows must have been checked by ``validate_rows`` first."""
    for index, item in enumerate(items):
        message, problems = build(item, defaults, index)
        if message is None:
            raise MessageValidationError(problems)
        yield index, message

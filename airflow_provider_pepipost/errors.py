"""Every exception the provider raises, and how Pepipost's error codes are classified.

Messages say what went wrong and what to do; none of them ever carries the API key.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from airflow_provider_pepipost.version_compat import AirflowFailException


class PepipostError(Exception):
    """Base class of all errors raised by this provider."""


class FailureKind(str, Enum):
    """What a failed send means for the rest of the campaign."""

    TRANSIENT = "transient"  # retry the same message later (429, 5xx, 8005)
    RECIPIENT = "recipient"  # this recipient cannot get it (8002, 8003, 8007); go on with the others
    MESSAGE = "message"  # the vendor refused this message's content (8001, 8006); go on with the others
    JOB = "job"  # every further send would fail the same way (bad key, 8004, 8008): stop now


# From docs/pepipost/api-notes.md. Codes not listed are treated as MESSAGE: the vendor
# refused one message for a reason we do not know, which is no reason to stop the campaign.
ERROR_CODE_KINDS: dict[str, FailureKind] = {
    "8001": FailureKind.MESSAGE,
    "8002": FailureKind.RECIPIENT,
    "8003": FailureKind.RECIPIENT,
    "8004": FailureKind.JOB,
    "8005": FailureKind.TRANSIENT,
    "8006": FailureKind.MESSAGE,
    "8007": FailureKind.RECIPIENT,
    "8008": FailureKind.JOB,
}


# What to check when a failure stops the whole send, by vendor code or HTTP status.
JOB_FAILURE_HINTS: dict[str, str] = {
    "8004": "the API key was refused; check the connection's password.",
    "401": "the API key was refused; check the connection's password.",
    "403": "the API key may not use this endpoint or source; check the key and the source id.",
    "8008": "the media could not be used; check the attachment id or URL.",
    "404": "the endpoint was not found; check the connection's host and extra 'endpoint'.",
    "405": "the endpoint does not take this request; check the connection's host and extra 'endpoint'.",
}
JOB_FAILURE_DEFAULT_HINT = "every further send would fail the same way."


def kind_of_failure(code: str | None, http_status: int | None) -> FailureKind:
    """Classify a failed send by the vendor's error code first, then by the HTTP status."""
    if code is not None and code in ERROR_CODE_KINDS:
        return ERROR_CODE_KINDS[code]
    if http_status is not None:
        if http_status in (408, 429) or http_status >= 500:
            return FailureKind.TRANSIENT
        if http_status in (401, 403, 404, 405) or 300 <= http_status < 400:
            return FailureKind.JOB
    return FailureKind.MESSAGE


class PepipostApiError(PepipostError):
    """Pepipost refused a request, or answered with something that is not its documented shape."""

    def __init__(
        self,
        code: str | None,
        message: str,
        *,
        http_status: int | None = None,
        kind: FailureKind | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.code = code
        self.message = message
        self.http_status = http_status
        self.kind = kind or kind_of_failure(code, http_status)
        self.retry_after = retry_after
        super().__init__(self._describe())

    def _describe(self) -> str:
        if self.kind is not FailureKind.JOB:
            return f"{self.label}: {self.message}"
        said = self.message.strip().rstrip(".").strip()  # the vendor's own full stop, not a second one
        return f"{self.label}{f': {said}' if said else ''}. This stops the whole send: " + (
            self.hint or JOB_FAILURE_DEFAULT_HINT
        )

    @property
    def label(self) -> str:
        """``Pepipost error 8004 (HTTP 401)``: the code and status, without the vendor's words."""
        label = f"Pepipost error {self.code}" if self.code else "Pepipost error"
        return label + (f" (HTTP {self.http_status})" if self.http_status is not None else "")

    @property
    def hint(self) -> str | None:
        """What to check, for a failure that is about the key or the endpoint (see ``JOB_FAILURE_HINTS``)."""
        return JOB_FAILURE_HINTS.get(self.code or "") or JOB_FAILURE_HINTS.get(str(self.http_status))

    @property
    def is_transient(self) -> bool:
        return self.kind is FailureKind.TRANSIENT


class PepipostOutcomeUnknownError(PepipostError):
    """The request went out, and the answer cannot tell whether the vendor processed it.

    A read timeout, a connection dropped after sending, a gateway's 5xx page, an answer over the
    size or time limit: the vendor may have accepted the message, so it is not sent again. The row
    is recorded as unknown and reconciled from the delivery reports, which echo its x-apiheader.
    """


class PepipostNotSentError(PepipostError):
    """The request could not reach the vendor (DNS, refused connection, TLS, proxy): nothing was sent.

    ``retryable`` is False where trying again later cannot help (a TLS or certificate problem is
    the connection's configuration, not the network's mood).
    """

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        self.retryable = retryable
        super().__init__(message)


@dataclass(frozen=True)
class RowProblem:
    """One thing wrong with one input row."""

    row: int
    field: str
    value: str
    reason: str
    line: int | None = None  # the row's line in the file it came from, where there is one

    def __str__(self) -> str:
        where = f"row {self.row}" + (f" (line {self.line} of the file)" if self.line is not None else "")
        return f"{where}, field '{self.field}' = {self.value}: {self.reason}"


class MessageValidationError(PepipostError, ValueError):
    """The input rows hold bad values. Raised before anything is sent."""

    # A million-row audience can hold a million problems; the message shows the first ones.
    SHOWN = 50

    def __init__(self, problems: list[RowProblem], total_problems: int | None = None) -> None:
        self.problems = problems
        self.total_problems = total_problems if total_problems is not None else len(problems)
        lines = [str(p) for p in problems[: self.SHOWN]]
        more = self.total_problems - len(lines)
        if more > 0:
            lines.append(f"... and {more} more")
        super().__init__(
            f"{self.total_problems} problem(s) in the recipients; nothing was sent. Fix these rows:\n  "
            + "\n  ".join(lines)
        )


class PepipostConfigError(PepipostError, ValueError):
    """The connection, an argument or a setting is missing or wrong."""


class StatusStoreUnavailable(PepipostError):
    """The status store's database could not be reached or opened."""


class CampaignError(PepipostError):
    """The campaign stopped or ended with more rejections or unknown outcomes than allowed."""


class WhatsAppDeliveryFailed(AirflowFailException):
    """Too many messages failed delivery; retrying the sensor would not change that."""

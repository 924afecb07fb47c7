"""What the sandbox knows and has seen, shared by its send and consent routes, and the vendor's
failure answer they both give."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from airflow_provider_pepipost.sandbox.reports import ReportSender
from airflow_provider_pepipost.sandbox.scenario import Scenario
from airflow_provider_pepipost.sandbox.subscribers import subscriber


@dataclass
class SandboxState:
    """What the sandbox knows and has seen. Read by tests through ``SandboxServer``."""

    scenario: Scenario
    api_key: str
    sources: set[str] | None  # None: any source id is valid
    media_ids: set[str] | None  # None: any attachment id is valid
    record_bodies: bool = True
    reports: ReportSender | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: int = 0
    responses: Counter[str] = field(default_factory=Counter)  # outcome -> count ('accepted', '8006', '429', ...)
    accepted: list[dict[str, Any]] = field(default_factory=list)  # bodies, when record_bodies
    accepted_count: int = 0
    accepted_by_header: Counter[str | None] = field(default_factory=Counter)
    accepted_by_type: Counter[str] = field(default_factory=Counter)  # media / template
    final_by_id: dict[str, str] = field(default_factory=dict)  # message id -> final status it will reach
    attempts: Counter[str] = field(default_factory=Counter)
    accepted_by_recipient: Counter[str] = field(default_factory=Counter)
    # By subscriber: the id of the last message accepted for it, and of the last template with
    # quick-reply buttons (with the template's name): what a reply or tap made by hand answers.
    last_accepted: dict[str, str] = field(default_factory=dict)
    last_with_buttons: dict[str, tuple[str, str]] = field(default_factory=dict)
    # Consent: numbers opted in through the API (with what the call said), and opted out.
    opted_in: dict[str, dict[str, Any]] = field(default_factory=dict)
    opted_out: set[str] = field(default_factory=set)
    consent_calls: list[dict[str, Any]] = field(default_factory=list)  # {"type", "recipients"}, in order
    outage_until: float = 0.0
    # Set by the server: closes a request's connection without answering.
    drop_connection: Callable[[Request], None] | None = None

    def opted_in_now(self, recipient: str) -> bool:
        """What the vendor's opt-in check before every send finds (8002 when False)."""
        recipient = subscriber(recipient)
        with self.lock:
            if recipient in self.opted_out:
                return False
            return recipient in self.opted_in or not self.scenario.needs_optin(recipient)

    def funnel(self) -> dict[str, int]:
        """How many accepted messages will end in each status: what the demo's report must show."""
        with self.lock:
            return dict(Counter(self.final_by_id.values()))


def failure(
    code: str, message: str, http_status: int, state: SandboxState, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The vendor's failure answer, counted by its code."""
    with state.lock:
        state.responses[code] += 1
    if state.scenario.failures_with_http_200 and http_status < 500:
        http_status = 200
    return JSONResponse(
        {"status": "failure", "error": {"code": code, "message": message}}, status_code=http_status, headers=headers
    )

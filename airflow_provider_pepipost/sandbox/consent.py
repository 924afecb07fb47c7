"""The sandbox's consent API: ``POST /api/v2/consent/manage/`` and ``POST /api/v2/consent/``.

Checks bodies as the vendor's consent page describes (docs/pepipost/template-and-consent.md,
"Consent"), with its messages, in code of its own. Opt-ins lift the 8002 the send path answers to
recipients without one (scenario ``optin_required_ratio``); opt-outs bring it back.
"""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from airflow_provider_pepipost.sandbox.state import SandboxState, failure
from airflow_provider_pepipost.sandbox.subscribers import subscriber

KINDS = ("optin", "optout")
SOURCE_MAX = 25


def check_consent_body(body: Any) -> str | None:
    """The vendor's validation of a manage body: None when valid, else its 8006 message."""
    if not isinstance(body, dict) or body.get("type") in (None, ""):
        return "type is required."
    if body["type"] not in KINDS:
        return "type is invalid. type must be optin/optout."
    recipients = body.get("recipients")
    if not isinstance(recipients, list) or not recipients:
        return "recipients is required."
    for item in recipients:
        if not isinstance(item, dict):
            return "recipients is required."
        source = item.get("source")
        if not isinstance(source, str) or not source.strip():
            return "source cannot be empty."
        if len(source) > SOURCE_MAX:
            return f"source value cannot be greater than {SOURCE_MAX} characters."
        number = item.get("recipient")
        if not isinstance(number, str) or not number.isdigit() or not number.isascii():
            return "Invalid recipient. Only numeric values allowed."
        if len(number) < 10:
            return "recipient value cannot be less than 10 digits."
        if len(number) > 15:
            return "recipient value cannot be greater than 15 digits."
        if item.get("ip") not in (None, ""):
            try:
                ipaddress.ip_address(str(item["ip"]))
            except ValueError:
                return "ip is invalid."
    return None


def add_consent_routes(
    app: FastAPI, state: SandboxState, refused: Callable[[Request], Awaitable[JSONResponse | None]]
) -> None:
    """Mount the consent endpoints on the sandbox app.

    :param refused: the answer to a request the sandbox turns away before reading it (outage,
        auth), or None.
    """
    api = ConsentApi(state, refused)
    app.add_api_route("/api/v2/consent/manage/", api.manage, methods=["POST"])
    app.add_api_route("/api/v2/consent/", api.check, methods=["POST"])


class ConsentApi:
    """The consent routes, on the sandbox's state."""

    def __init__(self, state: SandboxState, refused: Callable[[Request], Awaitable[JSONResponse | None]]) -> None:
        self.state, self.refused = state, refused

    async def manage(self, request: Request) -> JSONResponse:
        """``POST /api/v2/consent/manage/``: opt numbers in or out."""
        if (answer := await self.refused(request)) is not None:
            return answer
        body = await _read(request)
        if problem := check_consent_body(body):
            return failure("8006", problem, 400, self.state)
        kind = body["type"]
        self._record(kind, body)
        word = "Optin" if kind == "optin" else "Optout"
        return JSONResponse({"status": "success", "message": f"{word} successfully added."})

    def _record(self, kind: str, body: dict[str, Any]) -> None:
        """A checked call's numbers opted in (lifting an opt-out) or out (dropping an opt-in)."""
        state = self.state
        numbers = [item["recipient"] for item in body["recipients"]]
        with state.lock:
            state.consent_calls.append({"type": kind, "recipients": numbers})
            for number in numbers:
                phone = subscriber(number)
                if kind == "optin":
                    state.opted_out.discard(phone)
                    state.opted_in[phone] = {**body_item(body, number), "created_date": _now()}
                else:
                    state.opted_in.pop(phone, None)
                    state.opted_out.add(phone)
            state.responses[f"consent_{kind}"] += 1

    async def check(self, request: Request) -> JSONResponse:
        """``POST /api/v2/consent/``: what the vendor holds for one number's opt-in."""
        if (answer := await self.refused(request)) is not None:
            return answer
        body = await _read(request)
        number = body.get("phone_number") if isinstance(body, dict) else None
        if not isinstance(number, str) or not number:
            return failure("8006", "phone_number is required.", 400, self.state)
        with self.state.lock:
            found = self.state.opted_in.get(subscriber(number))
        if found is None:
            # The vendor's answer names no code here.
            return JSONResponse({"status": "failure", "error": {"message": f"Optin details not found for {number}"}})
        data = {
            "ip": found.get("ip", ""),
            "phone_number": number,
            "optin_source": found.get("source", ""),
            "user_agent": found.get("user_agent", ""),
            "created_date": found["created_date"],
        }
        return JSONResponse({"status": "success", "data": data})


async def _read(request: Request) -> Any:
    """The body as JSON, or None."""
    try:
        return json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        return None


def body_item(body: dict[str, Any], number: str) -> dict[str, Any]:
    return next(item for item in body["recipients"] if item["recipient"] == number)


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S.0", time.gmtime())

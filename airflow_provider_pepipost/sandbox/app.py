"""The sandbox's API: a Pepipost-compatible ``POST /api/v2/message/`` that checks requests as the vendor does.

Checks the Bearer key, then the body, from the vendor's send page (docs/pepipost/), with code
of its own: it imports nothing from the provider's message model.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from airflow_provider_pepipost.sandbox.consent import add_consent_routes
from airflow_provider_pepipost.sandbox.replies import add_reply_routes
from airflow_provider_pepipost.sandbox.reports import AcceptedMessage
from airflow_provider_pepipost.sandbox.scenario import RECIPIENT_ERRORS, Scenario
from airflow_provider_pepipost.sandbox.state import SandboxState, failure
from airflow_provider_pepipost.sandbox.subscribers import subscriber

__all__ = ["SandboxApi", "SandboxState", "create_sandbox_app"]

_DIGITS = re.compile(r"^[0-9]{10,15}$")
_MEDIA_TYPES = {"image", "video", "audio", "document", "sticker"}


def _check_message(item: Any, state: SandboxState) -> tuple[str, str] | None:
    """The vendor's validation of one message: None when valid, else (code, message)."""
    if not isinstance(item, dict):
        return "8006", "message must be an object."
    for name in ("recipient_whatsapp", "message_type", "source"):
        if item.get(name) in (None, ""):
            return "8001", f"{name} is required."
    if item["message_type"] not in ("media", "template"):
        return "8006", "type is required."
    recipient_type = item.get("recipient_type", "individual")
    if recipient_type not in ("individual", "group"):
        return "8006", "recipient_type is invalid."
    recipient = item["recipient_whatsapp"]
    if not isinstance(recipient, str) or (recipient_type == "individual" and not _DIGITS.match(recipient)):
        return "8006", "recipient_whatsapp is invalid."
    if state.sources is not None and item["source"] not in state.sources:
        return "8006", "source is invalid."
    if "x-apiheader" in item and not isinstance(item["x-apiheader"], str):
        return "8006", "x-apiheader is invalid."
    if item["message_type"] == "template":
        return _check_template(item, state.scenario.templates)
    media = item.get("type_media")
    if not isinstance(media, list) or not media or not isinstance(media[0], dict):
        return "8001", "type_media is required."
    attachments = media[0].get("attachments")
    if not isinstance(attachments, list) or not attachments or not isinstance(attachments[0], dict):
        return "8001", "attachments is required."
    attachment = attachments[0]
    if "caption" in attachment and not isinstance(attachment["caption"], str):
        return "8006", "caption is invalid."
    if attachment.get("attachment_id"):
        if state.media_ids is not None and attachment["attachment_id"] not in state.media_ids:
            return "8008", "Invalid media id."
    elif attachment.get("attachment_url"):
        if attachment.get("attachment_type") not in _MEDIA_TYPES:
            return "8006", "attachment_type is invalid."
        if not str(attachment["attachment_url"]).startswith(("http://", "https://")):
            return "8008", "Invalid media url."
    else:
        return "8001", "attachment_id is required."
    return None


GATEWAY_502_PAGE = (
    "<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1></center>"
    "<hr><center>nginx</center></body></html>"
)


def _after_acceptance(fault: str, answer: dict[str, Any], sc: Scenario) -> Response:
    """The vendor took the message; what reaches the client is not its answer."""
    if fault == "gateway_502":
        return HTMLResponse(GATEWAY_502_PAGE, status_code=502)
    body = json.dumps(answer).encode()

    async def trickle() -> AsyncIterator[bytes]:
        for index in range(len(body)):
            yield body[index : index + 1]
            await asyncio.sleep(sc.trickle_interval)

    async def huge() -> AsyncIterator[bytes]:
        yield body[:-1] + b', "padding": "'
        chunk = b"x" * 65536
        for _ in range(sc.huge_bytes // len(chunk)):
            yield chunk

    return StreamingResponse(trickle() if fault == "trickle" else huge(), media_type="application/json")


def _check_template(item: dict[str, Any], approved: dict[str, dict[str, Any]]) -> tuple[str, str] | None:
    """A template message against the approved templates, as the vendor checks it."""
    templates = item.get("type_template")
    if not isinstance(templates, list) or len(templates) != 1 or not isinstance(templates[0], dict):
        return "8001", "type_template is required."
    template = templates[0]
    name, language = template.get("name"), template.get("language")
    if not isinstance(name, str) or not name:
        return "8001", "template name is required."
    if not isinstance(language, dict) or not isinstance(language.get("locale"), str):
        return "8001", "language locale is required."
    if "policy" in language and language["policy"] not in ("deterministic", "fallback"):
        return "8006", "language policy is invalid."
    known = approved.get(name)
    if known is None or known.get("locale") != language["locale"]:
        return "8006", f"Template {name} ({language['locale']}) is not approved."
    attributes = template.get("attributes", [])
    if not isinstance(attributes, list) or not all(isinstance(a, str) and a for a in attributes):
        return "8006", "attributes must be a list of non-empty strings."
    if len(attributes) != known.get("attributes", 0):
        return "8006", f"Template {name} takes {known.get('attributes', 0)} attributes, not {len(attributes)}."
    if "ttl" in item and (not isinstance(item["ttl"], int) or isinstance(item["ttl"], bool) or item["ttl"] < 1):
        return "8006", "ttl is invalid."
    header = item.get("type_media_template")
    if known.get("header") is None:
        if header is not None:
            return "8006", f"Template {name} has no media header."
        return None
    if not isinstance(header, dict) or header.get("type") != known["header"]:
        return "8006", f"Template {name} needs a {known['header']} header."
    if not str(header.get("url", "")).startswith(("http://", "https://")):
        return "8008", "Invalid media url."
    return None


class SandboxApi:
    """The sandbox's routes, one method each, sharing one ``SandboxState``."""

    def __init__(self, state: SandboxState) -> None:
        self.state = state

    async def refused(self, request: Request) -> JSONResponse | None:
        """Outage and auth: what turns a request away. The body is read first, as a vendor holding
        the whole request would process it even if its client died during the latency."""
        state, sc = self.state, self.state.scenario
        await request.body()
        with state.lock:
            state.requests += 1
            number = state.requests
            if sc.outage_after is not None and number == sc.outage_after + 1:
                state.outage_until = time.monotonic() + sc.outage_seconds
            in_outage = time.monotonic() < state.outage_until or (
                sc.outage_after is not None and sc.outage_after < number <= sc.outage_after + sc.outage_requests
            )
        if sc.latency:
            await asyncio.sleep(sc.latency)
        if in_outage:
            return failure("503", "Service unavailable (sandbox outage)", 503, state)
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Bearer "):
            return failure("8004", "Authorization header must be 'Bearer <API key>'.", 403, state)
        if auth[7:] != state.api_key:
            return failure("8004", "Client details not found.", 401, state)
        return None

    async def send_message(self, request: Request) -> Response:
        """``POST /api/v2/message/``: turned away, faulted, refused for the recipient, or accepted."""
        sc = self.state.scenario
        if (answer := await self.refused(request)) is not None:
            return answer
        read = await self._read_message(request)
        if isinstance(read, Response):
            return read
        body, item = read
        # Tries are counted per message; what each try meets is drawn from the recipient and kind.
        draw_key = sc.draw_key(item["recipient_whatsapp"], item["message_type"])
        fault = sc.request_fault(draw_key, self._count_attempt(item))
        if (answer := self._fault_before_acceptance(fault, request)) is not None:
            return answer
        if (answer := self._recipient_refusal(item)) is not None:
            return answer
        message_id = self._accept(body, item, draw_key)
        if fault == "slow":
            await asyncio.sleep(sc.slow_seconds)
        answer_body = {"status": "success", "message": "Request received successfully.", "data": {"id": message_id}}
        if fault in ("gateway_502", "trickle", "huge"):
            with self.state.lock:
                self.state.responses[fault] += 1
            return _after_acceptance(fault, answer_body, sc)
        return JSONResponse(answer_body)

    async def _read_message(self, request: Request) -> tuple[dict[str, Any], dict[str, Any]] | JSONResponse:
        """The body and its one message, checked as the vendor checks them; or the vendor's answer."""
        state = self.state
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            return failure("8006", "Request body must be JSON.", 400, state)
        messages = body.get("message") if isinstance(body, dict) else None
        if not isinstance(messages, list) or not messages:
            return failure("8001", "message is required.", 400, state)
        if len(messages) != 1:
            return failure("8006", "Send one message per request.", 400, state)
        item = messages[0]
        if problem := _check_message(item, state):
            return failure(*problem, 400, state)
        return body, item

    def _count_attempt(self, item: dict[str, Any]) -> int:
        """The how-many-th try of this message this request is."""
        content = item.get("type_media") or item.get("type_template")
        identity = item.get("x-apiheader") or f"{item['recipient_whatsapp']}|{json.dumps(content)}"
        with self.state.lock:
            self.state.attempts[identity] += 1
            return self.state.attempts[identity]

    def _fault_before_acceptance(self, fault: str | None, request: Request) -> JSONResponse | None:
        """The scenario's faults that answer before the vendor takes the message."""
        state, sc = self.state, self.state.scenario
        if fault == "429":
            headers = {"Retry-After": f"{sc.retry_after:g}"} if sc.retry_after is not None else None
            return failure("429", "Too many requests.", 429, state, headers)
        if fault == "5xx":
            return failure("500", "Internal server error.", 500, state)
        if fault == "8005":
            return failure("8005", "Technical error, please retry.", 500, state)
        if fault == "drop":
            with state.lock:
                state.responses["drop"] += 1
            if state.drop_connection is not None:
                state.drop_connection(request)
            return JSONResponse({}, status_code=500)  # never reaches the client: its socket is gone
        return None

    def _recipient_refusal(self, item: dict[str, Any]) -> JSONResponse | None:
        """No opt-in (8002), or the scenario's refusal of this recipient."""
        recipient = item["recipient_whatsapp"]
        if item.get("recipient_type", "individual") == "individual" and not self.state.opted_in_now(recipient):
            return failure("8002", RECIPIENT_ERRORS["8002"], 400, self.state)
        if code := self.state.scenario.recipient_error(recipient, item["message_type"]):
            return failure(code, RECIPIENT_ERRORS[code], 400, self.state)
        return None

    def _accept(self, body: dict[str, Any], item: dict[str, Any], draw_key: str) -> str:
        """Take the message: count it, fix the status it will reach, queue its reports. Returns its id."""
        state = self.state
        message_id = str(uuid.uuid4())
        recipient, kind, header = item["recipient_whatsapp"], item["message_type"], item.get("x-apiheader")
        template = item["type_template"][0]["name"] if kind == "template" else None
        accepted = AcceptedMessage(
            message_id, recipient, item["source"], header, time.time(), draw_key, kind=kind, template=template
        )
        number = subscriber(recipient)
        with state.lock:
            state.responses["accepted"] += 1
            state.accepted_count += 1
            state.accepted_by_header[header] += 1
            state.accepted_by_type[kind] += 1
            state.accepted_by_recipient[number] += 1
            state.last_accepted[number] = message_id
            if state.scenario.buttons(template):
                state.last_with_buttons[number] = (message_id, str(template))
            state.final_by_id[message_id] = state.scenario.final_status(draw_key)
            if state.record_bodies:
                state.accepted.append({"message_id": message_id, "body": body})
        if state.reports:
            state.reports.schedule(accepted)
        return message_id

    async def recipient_state(self, number: str) -> dict[str, Any]:
        """What the sandbox holds for one number: messages accepted, opt-in."""
        with self.state.lock:
            accepted = self.state.accepted_by_recipient[subscriber(number)]
        return {"accepted": accepted, "opted_in": self.state.opted_in_now(number)}

    async def stats(self) -> dict[str, Any]:
        state = self.state
        with state.lock:
            data: dict[str, Any] = {
                "requests": state.requests,
                "accepted": state.accepted_count,
                "accepted_by_type": dict(state.accepted_by_type),
                "responses": dict(state.responses),
                "funnel": dict(Counter(state.final_by_id.values())),
                "consent_calls": len(state.consent_calls),
                "opted_out": len(state.opted_out),
                "taps_posted": state.reports.taps_queued if state.reports else 0,
            }
        if state.reports:
            data["reports"] = {
                "pending": state.reports.pending(),
                "events_posted": state.reports.events_posted,
                "events_lost": state.reports.events_lost,
            }
        return data


def create_sandbox_app(state: SandboxState) -> FastAPI:
    app = FastAPI(title="Pepipost WhatsApp sandbox", docs_url=None, redoc_url=None, openapi_url=None)
    api = SandboxApi(state)
    app.add_api_route("/api/v2/message/", api.send_message, methods=["POST"])
    app.add_api_route("/api/v2/message/nc", api.send_message, methods=["POST"])
    add_consent_routes(app, state, api.refused)
    add_reply_routes(app, state)
    app.add_api_route("/_sandbox/recipients/{number}", api.recipient_state, methods=["GET"])
    app.add_api_route("/_sandbox/stats", api.stats, methods=["GET"])
    return app

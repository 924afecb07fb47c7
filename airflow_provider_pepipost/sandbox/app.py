"""The sandbox's API: a Pepipost-compatible ``POST /api/v2/message/`` that checks requests as the vendor does.

Checks the Bearer key, then the body, from the vendor's send page (docs/pepipost/), with code
of its own: it imports nothing from the provider's message model.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from airflow_provider_pepipost.sandbox.consent import add_consent_routes
from airflow_provider_pepipost.sandbox.reports import AcceptedMessage, ReportSender
from airflow_provider_pepipost.sandbox.scenario import RECIPIENT_ERRORS, Scenario
from airflow_provider_pepipost.sandbox.subscribers import subscriber

_DIGITS = re.compile(r"^[0-9]{10,15}$")
_MEDIA_TYPES = {"image", "video", "audio", "document", "sticker"}


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
    responses: Counter = field(default_factory=Counter)  # outcome -> count ('accepted', '8006', '429', ...)
    accepted: list[dict[str, Any]] = field(default_factory=list)  # bodies, when record_bodies
    accepted_count: int = 0
    accepted_by_header: Counter = field(default_factory=Counter)
    accepted_by_type: Counter = field(default_factory=Counter)  # media / template
    final_by_id: dict[str, str] = field(default_factory=dict)  # message id -> final status it will reach
    attempts: Counter = field(default_factory=Counter)
    accepted_by_recipient: Counter = field(default_factory=Counter)
    # Consent: numbers opted in through the API (with what the call said), and opted out.
    opted_in: dict[str, dict[str, Any]] = field(default_factory=dict)
    opted_out: set[str] = field(default_factory=set)
    consent_calls: list[dict[str, Any]] = field(default_factory=list)  # {"type", "recipients"}, in order
    outage_until: float = 0.0
    drop_connection: Any = None  # set by the server: closes a request's connection without answering

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


def _failure(
    code: str, message: str, http_status: int, state: SandboxState, headers: dict | None = None
) -> JSONResponse:
    with state.lock:
        state.responses[code] += 1
    if state.scenario.failures_with_http_200 and http_status < 500:
        http_status = 200
    return JSONResponse(
        {"status": "failure", "error": {"code": code, "message": message}}, status_code=http_status, headers=headers
    )


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

    async def trickle() -> Any:
        for index in range(len(body)):
            yield body[index : index + 1]
            await asyncio.sleep(sc.trickle_interval)

    async def huge() -> Any:
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


def create_sandbox_app(state: SandboxState) -> FastAPI:
    app = FastAPI(title="Pepipost WhatsApp sandbox", docs_url=None, redoc_url=None, openapi_url=None)

    async def refused(request: Request) -> JSONResponse | None:
        """Outage and auth: what turns a request away. The body is read first, as a vendor holding
        the whole request would process it even if its client died during the latency."""
        sc = state.scenario
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
            return _failure("503", "Service unavailable (sandbox outage)", 503, state)
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Bearer "):
            return _failure("8004", "Authorization header must be 'Bearer <API key>'.", 403, state)
        if auth[7:] != state.api_key:
            return _failure("8004", "Client details not found.", 401, state)
        return None

    async def send_message(request: Request) -> JSONResponse:
        sc = state.scenario
        if (answer := await refused(request)) is not None:
            return answer
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            return _failure("8006", "Request body must be JSON.", 400, state)
        messages = body.get("message") if isinstance(body, dict) else None
        if not isinstance(messages, list) or not messages:
            return _failure("8001", "message is required.", 400, state)
        if len(messages) != 1:
            return _failure("8006", "Send one message per request.", 400, state)
        item = messages[0]
        if problem := _check_message(item, state):
            return _failure(*problem, 400, state)

        content = item.get("type_media") or item.get("type_template")
        # Tries are counted per message; what each try meets is drawn from the recipient and kind.
        identity = item.get("x-apiheader") or f"{item['recipient_whatsapp']}|{json.dumps(content)}"
        draw_key = sc.draw_key(item["recipient_whatsapp"], item["message_type"])
        with state.lock:
            state.attempts[identity] += 1
            attempt = state.attempts[identity]
        fault = sc.request_fault(draw_key, attempt)
        if fault == "429":
            headers = {"Retry-After": f"{sc.retry_after:g}"} if sc.retry_after is not None else None
            return _failure("429", "Too many requests.", 429, state, headers)
        if fault == "5xx":
            return _failure("500", "Internal server error.", 500, state)
        if fault == "8005":
            return _failure("8005", "Technical error, please retry.", 500, state)
        if fault == "drop":
            with state.lock:
                state.responses["drop"] += 1
            state.drop_connection(request)
            return JSONResponse({}, status_code=500)  # never reaches the client: its socket is gone
        recipient = item["recipient_whatsapp"]
        if item.get("recipient_type", "individual") == "individual" and not state.opted_in_now(recipient):
            return _failure("8002", RECIPIENT_ERRORS["8002"], 400, state)
        if code := sc.recipient_error(recipient, item["message_type"]):
            return _failure(code, RECIPIENT_ERRORS[code], 400, state)

        message_id = str(uuid.uuid4())
        accepted = AcceptedMessage(
            message_id,
            item["recipient_whatsapp"],
            item["source"],
            item.get("x-apiheader"),
            time.time(),
            draw_key,
            kind=item["message_type"],
        )
        with state.lock:
            state.responses["accepted"] += 1
            state.accepted_count += 1
            state.accepted_by_header[item.get("x-apiheader")] += 1
            state.accepted_by_type[item["message_type"]] += 1
            state.accepted_by_recipient[subscriber(recipient)] += 1
            state.final_by_id[message_id] = sc.final_status(draw_key)
            if state.record_bodies:
                state.accepted.append({"message_id": message_id, "body": body})
        if state.reports:
            state.reports.schedule(accepted)
        if fault == "slow":
            await asyncio.sleep(sc.slow_seconds)
        answer = {"status": "success", "message": "Request received successfully.", "data": {"id": message_id}}
        if fault in ("gateway_502", "trickle", "huge"):
            with state.lock:
                state.responses[fault] += 1
            return _after_acceptance(fault, answer, sc)
        return JSONResponse(answer)

    app.add_api_route("/api/v2/message/", send_message, methods=["POST"])
    app.add_api_route("/api/v2/message/nc", send_message, methods=["POST"])
    add_consent_routes(app, state, _failure, refused)

    @app.post("/_sandbox/reply")
    async def reply(request: Request) -> JSONResponse:
        """Make a recipient reply a text (``{"from", "text", "context_message_id"}``), posted at once."""
        body = await request.json()
        if not isinstance(body, dict) or not body.get("from") or not isinstance(body.get("text"), str):
            return JSONResponse({"detail": "give 'from' (a number) and 'text'"}, status_code=400)
        if not state.reports:
            return JSONResponse({"detail": "the sandbox has no --webhook-url to post the reply to"}, status_code=409)
        state.reports.reply(str(body["from"]), body["text"], body.get("context_message_id"))
        return JSONResponse({"queued": 1})

    @app.get("/_sandbox/recipients/{number}")
    async def recipient_state(number: str) -> dict[str, Any]:
        """What the sandbox holds for one number: messages accepted, opt-in."""
        with state.lock:
            accepted = state.accepted_by_recipient[subscriber(number)]
        return {"accepted": accepted, "opted_in": state.opted_in_now(number)}

    @app.get("/_sandbox/stats")
    async def stats() -> dict[str, Any]:
        with state.lock:
            data = {
                "requests": state.requests,
                "accepted": state.accepted_count,
                "accepted_by_type": dict(state.accepted_by_type),
                "responses": dict(state.responses),
                "funnel": dict(Counter(state.final_by_id.values())),
                "consent_calls": len(state.consent_calls),
                "opted_out": len(state.opted_out),
            }
        if state.reports:
            data["reports"] = {
                "pending": state.reports.pending(),
                "events_posted": state.reports.events_posted,
                "events_lost": state.reports.events_lost,
            }
        return data

    return app

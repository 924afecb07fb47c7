"""The sandbox's customer answers made by hand: ``POST /_sandbox/reply`` and ``POST /_sandbox/tap``.

A test or a demo makes one recipient answer now: a text, or a tap on a quick-reply button, posted
to the webhook as an ``incoming_message[]`` item written by the sandbox's own code (reports.py),
never the provider's parser. Numbers are matched as the sandbox counts sends
(``subscribers.subscriber``), so '+91 98…' answers what was sent to '9198…'.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from airflow_provider_pepipost.sandbox.reports import ReportSender
from airflow_provider_pepipost.sandbox.state import SandboxState
from airflow_provider_pepipost.sandbox.subscribers import subscriber


class Refusal(Exception):
    """A by-hand answer the sandbox will not post: the HTTP status and a detail naming what to fix."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail

    def response(self) -> JSONResponse:
        return JSONResponse({"detail": self.detail}, status_code=self.status)


def add_reply_routes(app: FastAPI, state: SandboxState) -> None:
    """Mount ``POST /_sandbox/reply`` and ``POST /_sandbox/tap`` on the sandbox app."""
    api = ReplyApi(state)
    app.add_api_route("/_sandbox/reply", api.reply, methods=["POST"])
    app.add_api_route("/_sandbox/tap", api.tap, methods=["POST"])


class ReplyApi:
    """The by-hand answer routes, on the sandbox's state."""

    def __init__(self, state: SandboxState) -> None:
        self.state = state

    async def reply(self, request: Request) -> JSONResponse:
        """``{"from", "text" | "button": {"payload", "text"}, "context_message_id"?, "in_reply_to_last"?}``:
        the reply answers ``context_message_id``, else (``in_reply_to_last``) the last message the
        sandbox accepted for that number, else nothing."""
        try:
            body = await _json_object(request)
            number = _number(body)
            text, button = _text_or_button(body)
            context = _optional_string(body, "context_message_id")
            follow_last = body.get("in_reply_to_last", False)
            if not isinstance(follow_last, bool):
                raise Refusal(400, "'in_reply_to_last' must be true or false")
            reports = self._reports()
            if context is None and follow_last:
                context = self._last_accepted(number)
        except Refusal as refusal:
            return refusal.response()
        if button is not None:
            return _queued(reports.tap(number, button, context))
        return _queued(reports.reply(number, str(text), context))

    async def tap(self, request: Request) -> JSONResponse:
        """``{"from", "payload"}``: a tap on that button of the last template with quick-reply
        buttons the sandbox accepted for that number, answering that message."""
        try:
            body = await _json_object(request)
            number = _number(body)
            payload = _string(body, "payload")
            reports = self._reports()
            message_id, template = self._last_with_buttons(number)
            buttons = self.state.scenario.buttons(template)
            button = next((b for b in buttons if b["payload"] == payload), None)
            if button is None:
                known = [b["payload"] for b in buttons]
                raise Refusal(400, f"'payload' {payload!r} is not a button of template {template}: one of {known}")
        except Refusal as refusal:
            return refusal.response()
        return _queued(reports.tap(number, {"payload": button["payload"], "text": button["text"]}, message_id))

    def _reports(self) -> ReportSender:
        if not self.state.reports:
            raise Refusal(409, "the sandbox has no --webhook-url to post the reply to")
        return self.state.reports

    def _last_accepted(self, number: str) -> str:
        with self.state.lock:
            message_id = self.state.last_accepted.get(subscriber(number))
        if message_id is None:
            raise Refusal(404, f"the sandbox accepted no message for {number}: send one, or give 'context_message_id'")
        return message_id

    def _last_with_buttons(self, number: str) -> tuple[str, str]:
        with self.state.lock:
            last = self.state.last_with_buttons.get(subscriber(number))
        if last is None:
            with_buttons = sorted(name for name in self.state.scenario.templates if self.state.scenario.buttons(name))
            raise Refusal(
                404,
                f"the sandbox accepted no template with quick-reply buttons for {number}: "
                f"send one of {with_buttons} first",
            )
        return last


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict):
        raise Refusal(400, "the body must be a JSON object")
    return body


def _number(body: dict[str, Any]) -> str:
    value = body.get("from")
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise Refusal(400, "'from' is required: the customer's number (a string or an integer)")
    return str(value)


def _string(body: dict[str, Any], name: str, where: str = "") -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise Refusal(400, f"'{where}{name}' is required: a non-empty string")
    return value


def _optional_string(body: dict[str, Any], name: str) -> str | None:
    return None if body.get(name) is None else _string(body, name)


def _text_or_button(body: dict[str, Any]) -> tuple[str | None, dict[str, str] | None]:
    """The reply's one kind: ``text`` (a string), or ``button`` (``{"payload", "text"}``)."""
    if ("text" in body) == ("button" in body):
        raise Refusal(400, "give either 'text' (a string) or 'button' ({\"payload\": ..., \"text\": ...})")
    if "text" in body:
        if not isinstance(body["text"], str):
            raise Refusal(400, "'text' must be a string")
        return body["text"], None
    button = body["button"]
    if not isinstance(button, dict):
        raise Refusal(400, '\'button\' must be an object: {"payload": ..., "text": ...}')
    return None, {"payload": _string(button, "payload", "button."), "text": _string(button, "text", "button.")}


def _queued(item: dict[str, Any]) -> JSONResponse:
    return JSONResponse(
        {"queued": 1, "message_id": item["message_id"], "context_message_id": item["context"]["ncmessage_id"]}
    )

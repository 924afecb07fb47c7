"""The report route's shortcut past the framework: the same answers as the router gave, standalone and
mounted under a prefix as the plugin mounts it, over real HTTP (uvicorn on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import json

import pytest
import requests
from fastapi import FastAPI
from starlette.routing import Route

from airflow_provider_pepipost.webhook.app import create_app
from airflow_provider_pepipost.webhook.shortcut import ShortcutMiddleware, route_path
from tests.conftest import WEBHOOK_TOKEN
from tests.helpers import ServedApp

GOOD = {"X-Pepipost-Token": WEBHOOK_TOKEN, "Content-Type": "application/json"}


def report(message_id: str) -> bytes:
    item = {"ncmessage_id": message_id, "recipient": "919999999999", "status": "delivered", "status_remark": "",
            "received_at": "1700000000"}  # fmt: skip
    return json.dumps({"delivery_status": [item]}).encode()


# (name, headers, body): what each kind of report gets, through the shortcut and through the router
REQUESTS = [
    ("stored", GOOD, report("s1")),
    ("wrong token", {**GOOD, "X-Pepipost-Token": "nope"}, report("s2")),
    ("not JSON", {**GOOD, "Content-Type": "image/png"}, report("s3")),
    ("too large", GOOD, b" " * 2048 + report("s4")),
    ("unreadable", GOOD, b"{not json"),
]


def without_shortcut(app: FastAPI) -> FastAPI:
    app.user_middleware = [m for m in app.user_middleware if m.cls is not ShortcutMiddleware]
    return app


def answers(url: str, suffix: str) -> list[tuple[int, dict, str | None]]:
    out = []
    for name, headers, body in REQUESTS:
        body = body.replace(b'"s', f'"{suffix}'.encode()) if name == "stored" else body
        answer = requests.post(url, data=body, headers=headers, timeout=10)
        out.append((answer.status_code, answer.json(), answer.headers.get("content-type")))
    return out


def test_the_shortcut_answers_every_kind_of_report_as_the_router_does(sqlite_url):
    with (
        ServedApp(create_app(sqlite_url, WEBHOOK_TOKEN, max_body_bytes=1024)) as fast,
        ServedApp(without_shortcut(create_app(sqlite_url, WEBHOOK_TOKEN, max_body_bytes=1024))) as routed,
    ):
        through_shortcut = answers(f"{fast.url}/pepipost/webhook", "a")
        through_router = answers(f"{routed.url}/pepipost/webhook", "b")
    assert through_shortcut == through_router
    assert [status for status, _, _ in through_shortcut] == [200, 401, 415, 413, 400]


def test_the_shortcut_serves_the_report_route_without_the_router(sqlite_url):
    """The router's route is made to answer 599: a report still stored and answered 200 went past it."""
    app = create_app(sqlite_url, WEBHOOK_TOKEN)

    async def refuse(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 599, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    app.router.routes = [
        Route(r.path, refuse, methods=["POST"]) if getattr(r, "path", "") == "/pepipost/webhook" else r
        for r in app.router.routes
    ]
    with ServedApp(app) as served:
        answer = requests.post(f"{served.url}/pepipost/webhook", data=report("r1"), headers=GOOD, timeout=10)
        assert answer.status_code == 200 and answer.json()["accepted"] == 1
        # What the shortcut does not take still goes to the router.
        assert requests.put(f"{served.url}/pepipost/webhook", data=b"", timeout=10).status_code == 405


def test_mounted_under_a_prefix_as_the_plugin_mounts_it(sqlite_url):
    """As Airflow's API server mounts a plugin's app: reports by the shortcut; other methods, other
    paths and a trailing slash answered by the router as before."""
    parent = FastAPI()
    parent.mount("/pepipost", create_app(sqlite_url, WEBHOOK_TOKEN, path_prefix=""))
    with ServedApp(parent) as served:
        url = f"{served.url}/pepipost/webhook"
        stored = requests.post(url, data=report("m1"), headers=GOOD, timeout=10)
        assert stored.status_code == 200 and stored.json()["accepted"] == 1
        refused = requests.post(url, data=report("m2"), headers={**GOOD, "X-Pepipost-Token": "x"}, timeout=10)
        assert (refused.status_code, refused.json()) == (401, {"detail": "missing or wrong token"})
        not_allowed = requests.get(url, timeout=10)
        assert not_allowed.status_code == 405 and not_allowed.headers["allow"] == "POST"
        slash = requests.post(f"{url}/", data=report("m3"), headers=GOOD, timeout=10, allow_redirects=False)
        assert slash.status_code == 307 and slash.headers["location"].endswith("/pepipost/webhook")
        assert requests.get(f"{served.url}/pepipost/healthz", timeout=10).json() == {"status": "ok"}


def test_a_busy_queue_is_503_with_retry_after_through_the_shortcut(sqlite_url):
    app = create_app(sqlite_url, WEBHOOK_TOKEN, max_queued_bodies=1)
    with ServedApp(app) as served:
        receiver_queue = next(
            m.kwargs["endpoint"].receiver.queue for m in app.user_middleware if m.cls is ShortcutMiddleware
        )
        with receiver_queue.admit(10):  # the one place taken
            answer = requests.post(f"{served.url}/pepipost/webhook", data=report("q1"), headers=GOOD, timeout=10)
    assert answer.status_code == 503 and answer.headers["retry-after"] == "5"
    assert answer.json() == {"detail": "the receiver is busy; send it again"}


@pytest.mark.parametrize(
    ("path", "root_path", "expected"),
    [
        ("/pepipost/webhook", "", "/pepipost/webhook"),
        ("/pepipost/webhook", "/pepipost", "/webhook"),  # mounted: Starlette keeps the whole path
        ("/webhook", "/pepipost", "/webhook"),  # an older Starlette: the path without the mount
        ("/pepipost", "/pepipost", ""),
        ("/pepipostx/webhook", "/pepipost", "/pepipostx/webhook"),  # not under the mount
    ],
)
def test_route_path_reads_the_path_as_the_router_does(path, root_path, expected):
    assert route_path({"path": path, "root_path": root_path}) == expected


@pytest.mark.parametrize(
    "content, status",
    [({"accepted": 1, "duplicates": 0}, 200), ({"detail": "could not store the batch; send it again"}, 503),
     ({"detail": "ünïcödé ✓"}, 200)],
)  # fmt: skip
def test_the_report_answer_is_what_starlettes_json_response_sends(content, status):
    from starlette.responses import JSONResponse

    from airflow_provider_pepipost.webhook.app import JSONAnswer

    def sent_by(response) -> list[dict]:
        messages: list[dict] = []

        async def send(message: dict) -> None:
            messages.append(message)

        async def receive() -> dict:
            return {"type": "http.disconnect"}

        asyncio.run(response({"type": "http"}, receive, send))
        return messages

    assert sent_by(JSONAnswer(content, status)) == sent_by(JSONResponse(content, status))

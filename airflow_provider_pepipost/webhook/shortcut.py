"""A shortcut through the framework for the one route that takes every report.

FastAPI's exception middleware, its exit-stack middleware, the router's matching and Starlette's
request-response wrapper cost a one-event report about 15 % of the receiver's CPU, for nothing
that route uses: it raises no exception for a handler to answer and needs no dependency. The
middleware here, the app's own, hands a request for exactly that path and method straight to the
route's endpoint. The route stays in the router, served by the same endpoint, so that what the
shortcut does not take (another method, a trailing slash) is answered as before.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send


def route_path(scope: Scope) -> str:
    """The request's path inside the app: without the prefix an app is mounted at (``root_path``).

    As Starlette's router reads it (``starlette._utils.get_route_path``, private there).
    """
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if not root_path or not path.startswith(root_path):
        return path
    if path == root_path:
        return ""
    return path[len(root_path) :] if path[len(root_path)] == "/" else path


class ShortcutMiddleware:
    """Serve ``method`` requests for ``path`` with ``endpoint`` (an ASGI app); the rest with the app."""

    def __init__(self, app: ASGIApp, *, path: str, method: str, endpoint: ASGIApp) -> None:
        self.app, self.path, self.method, self.endpoint = app, path, method, endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == self.method and route_path(scope) == self.path:
            await self.endpoint(scope, receive, send)
        else:
            await self.app(scope, receive, send)

"""The browser's session: the API token in an HttpOnly cookie, and CSRF protection.

Signing in checks the token with ``GET /api/me`` and keeps it in a cookie the page's scripts
cannot read (``HttpOnly``, ``SameSite=Strict``, ``Secure`` over HTTPS). ``CookieAuth`` turns
that cookie into the ``Authorization: Bearer`` header for the REST API, so the UI's scripts
call ``/api/...`` (and its server-sent events) exactly as any client does, and the API's own
authorization decides what they may see and do. A request that changes anything must carry
the page's CSRF token (an HMAC of the cookie under a per-server secret) in ``X-CSRF-Token``
or, for a plain form, a ``csrf`` field; a cross-site page can read neither.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from starlette.datastructures import MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

COOKIE = "fs_session"
CSRF_HEADER = "x-csrf-token"
SAFE = ("GET", "HEAD", "OPTIONS")


class CsrfKeys:
    """The server's CSRF secret (new at each start: a page loaded before a restart asks the
    user to reload, nothing worse)."""

    def __init__(self) -> None:
        self.secret = secrets.token_bytes(32)

    def token_for(self, session: str) -> str:
        return hmac.new(self.secret, session.encode(), hashlib.sha256).hexdigest()

    def valid(self, session: str, given: str | None) -> bool:
        return bool(given) and hmac.compare_digest(self.token_for(session), given or "")


def cookie_of(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"cookie":
            for part in value.decode("latin-1").split(";"):
                key, _, val = part.strip().partition("=")
                if key == COOKIE and val:
                    return val
    return None


class CookieAuth:
    """ASGI middleware: for ``/api/...`` requests with the UI's cookie and no Authorization
    header, the cookie's token as the bearer (the CSRF header required for a change)."""

    def __init__(self, app: ASGIApp, *, keys: CsrfKeys):
        self.app, self.keys = app, keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope.get("path", "").startswith("/api/"):
            await self.app(scope, receive, send)
            return
        headers = MutableHeaders(scope=scope)
        token = cookie_of(scope)
        if token is None or "authorization" in headers:
            await self.app(scope, receive, send)
            return
        if scope.get("method") not in SAFE and not self.keys.valid(token,
                                                                   headers.get(CSRF_HEADER)):
            await JSONResponse({"error": {
                "code": "csrf_failed", "message": "the page's CSRF token is missing or stale",
                "hint": "reload the page and try again"}}, status_code=403)(scope, receive, send)
            return
        headers["authorization"] = f"Bearer {token}"
        await self.app(scope, receive, send)

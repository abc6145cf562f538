"""What every request passes before a route sees it: a URL without NUL bytes or other control
characters, and a body within the server's limit (``FLOWSESSION_MAX_BODY``).

A body announced larger than the limit (``Content-Length``) is refused before it is read; one
that streams past it (chunked) is refused when the limit is crossed, by ``receive`` raising
``BodyTooLarge``, which FastAPI passes on untouched (it is an ``HTTPException``) to the app's
handler. Every refusal is the API's JSON error shape (``{"error": {"code", "message", "hint",
...}}``), and lands in the audit log like any other (the audit middleware wraps this one).
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flowsession.config import format_size
from flowsession.errors import FlowSessionError, InvalidInput, PayloadTooLarge

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class BodyTooLarge(StarletteHTTPException):
    """Raised from ``receive`` when a streamed body crosses the limit; carries the error."""

    def __init__(self, error: PayloadTooLarge):
        super().__init__(status_code=error.status, detail=error.message)
        self.error = error


class RequestGuard:
    def __init__(self, app: ASGIApp, *, max_body: int):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._url_refusal(scope) or self._length_refusal(scope)
        if refusal is not None:
            await answer(refusal, scope, receive, send)
            return
        received = 0
        started = False

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise BodyTooLarge(self.too_large())
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, watched)
        except BodyTooLarge as exc:  # read outside a route's body parsing: answered here
            if started:
                raise
            await answer(exc.error, scope, receive, send)

    def too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"the request body is larger than the server's limit of "
            f"{format_size(self.max_body)}",
            hint="send less at a time: upload large data as a file of the flow, or in parts; "
                 "the server's FLOWSESSION_MAX_BODY sets the limit",
            details={"limit": self.max_body})

    def _length_refusal(self, scope: Scope) -> FlowSessionError | None:
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    return None  # the server (h11) refuses a malformed length itself
                return self.too_large() if length > self.max_body else None
        return None

    @staticmethod
    def _url_refusal(scope: Scope) -> FlowSessionError | None:
        path = scope.get("path", "")
        if _CONTROL.search(path):
            return InvalidInput(f"the URL path {path!r} contains a NUL byte or another "
                                "control character", hint="names and file paths have none",
                                details={"field": "path"})
        query = scope.get("query_string", b"").decode("latin-1")
        for key, value in parse_qsl(query, keep_blank_values=True):
            if _CONTROL.search(key) or _CONTROL.search(value):
                return InvalidInput(f"the query parameter {key!r} contains a NUL byte or "
                                    "another control character",
                                    hint="give it without control characters",
                                    details={"field": f"query.{key}"})
        return None


async def answer(error: FlowSessionError, scope: Scope, receive: Receive, send: Send) -> None:
    scope.setdefault("state", {})["error_code"] = error.code  # for the audit log
    await JSONResponse({"error": error.to_dict()}, status_code=error.status)(scope, receive, send)

"""What every request passes before a route sees it: a URL without NUL bytes or other control
characters, and a body within the server's limit (``FLOWSESSION_MAX_BODY``).

A body announced larger than the limit (``Content-Length``) is refused before it is read; one
that streams past it (chunked) is refused when the limit is crossed, by ``receive`` raising
``BodyTooLarge``, which FastAPI passes on untouched (it is an ``HTTPException``) to the app's
handler. Every refusal is the API's JSON error shape (``{"error": {"code", "message", "hint",
...}}``), and lands in the audit log like any other (the audit middleware wraps this one).
"""

from __future__ import annotations

import json
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
        if _json_body(scope):  # read here (FastAPI reads it whole anyway) to check its text
            body, first = await self._read_body(receive)
            if isinstance(body, FlowSessionError):
                await answer(body, scope, _replay(b"", first, receive), send)
                return
            if _SURROGATE.search(body) and _has_lone_surrogate(body):
                await answer(InvalidInput(
                    "the request body holds text that is not valid Unicode (a lone surrogate "
                    "escape such as \\ud800)", hint="send text as UTF-8, without unpaired "
                    "surrogate escapes", details={"field": "body"}),
                    scope, _replay(body, first, receive), send)
                return
            receive = _replay(body, first, receive)
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

    async def _read_body(self, receive: Receive) -> tuple[bytes | FlowSessionError,
                                                         Message | None]:
        """The whole body (or the 413 when it crosses the limit), and a message that is not
        part of it (a disconnect) to hand on."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks), message
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return self.too_large(), None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None

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


_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _json_body(scope: Scope) -> bool:
    if scope.get("method") not in ("POST", "PUT", "PATCH"):
        return False
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            return b"json" in value.lower()
    return False


def _replay(body: bytes, after: Message | None, receive: Receive) -> Receive:
    """A ``receive`` that gives ``body`` once, then what came after it (a disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent, after
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        if after is not None:
            message, after = after, None
            return message
        return await receive()

    return replay


def _has_lone_surrogate(body: bytes) -> bool:
    """Does the JSON ``body`` hold a string (or key) with an unpaired surrogate? (A body that
    is not JSON is left to the route's own error.)"""
    try:
        todo = [json.loads(body)]
    except (ValueError, RecursionError):
        return False
    while todo:
        item = todo.pop()
        if isinstance(item, str):
            items = [item]
        elif isinstance(item, dict):
            items = list(item)
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item)
            continue
        else:
            continue
        for text in items:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                return True
    return False


async def answer(error: FlowSessionError, scope: Scope, receive: Receive, send: Send) -> None:
    scope.setdefault("state", {})["error_code"] = error.code  # for the audit log
    await JSONResponse({"error": error.to_dict()}, status_code=error.status)(scope, receive, send)

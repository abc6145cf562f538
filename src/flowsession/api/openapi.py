"""The OpenAPI document tells the truth about answers: every operation may answer with the
error body (``{"error": {code, message, hint, ...}}``) under the statuses errors.py uses, and
the event streams answer ``text/event-stream``. Clients (and the fuzz test) can rely on it."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

ERROR_STATUSES = {
    "400": "Bad request (a body that is not JSON, a header that cannot be read)",
    "401": "Authentication required (no detail of why)",
    "403": "The caller's roles lack the scope (named in error.scope)",
    "404": "Not found, or not the caller's",
    "405": "Method not allowed",
    "409": "Conflict with the resource's state",
    "413": "Request too large",
    "414": "URL too long",
    "415": "Unsupported media type",
    "422": "Invalid input (error.field names it)",
    "431": "Request headers too large",
    "500": "Unexpected failure (the server's log has the details)",
    "502": "A peer failed (a package index, a session)",
    "503": "Not available now (e.g. over quota); try again",
    "507": "Out of disk budget",
}
ERROR_SCHEMA = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["code", "message"],
                             "properties": {"code": {"type": "string"},
                                            "message": {"type": "string"},
                                            "hint": {"type": "string"}}}},
}
EVENT = {  # one server-sent event: its data is a JSON object; the last is "event: end"
    "type": "object", "required": ["data"],
    "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
}
EVENT_STREAMS = {"/api/runs/{name}/events", "/api/operations/{op_id}/events"}


def documented_schema(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description,
                         routes=app.routes)
    schema.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    for path, ops in schema.get("paths", {}).items():
        for op in ops.values():
            responses = op.setdefault("responses", {})
            for status, description in ERROR_STATUSES.items():
                responses[status] = {"description": description, **error}
            if path in EVENT_STREAMS:
                ok = next(s for s in responses if s.startswith("2"))
                responses[ok] = {"description": "Server-sent events until the subject ends",
                                 "content": {"text/event-stream": {"schema": EVENT}}}
    app.openapi_schema = schema
    return schema

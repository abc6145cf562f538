"""The SDK's connection to a flowsession server (``flowsession server``): requests with a
token, server-sent events, long operations followed to their end, and the answers' JSON as the
SDK's objects. Errors come back as the ``flowsession.errors`` class of their code."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from urllib.parse import quote

import httpx

from flowsession.api.operation_status import OperationStatus
from flowsession.errors import FlowSessionError, Forbidden, Unauthorized
from flowsession.runs.model import Run, RunStatus
from flowsession.sessions.model import Session

SUBMIT_TIMEOUT_S = 900.0  # a run's submission starts the flow's session when none runs
LONG_S = 120.0  # stops, uploads, compute changes: longer than a plain request
POLL_S = 0.5
Progress = Callable[[dict[str, Any]], None] | None


AuthenticationError = Unauthorized  # the server refused the token (401)
PermissionDenied = Forbidden  # the token's roles do not grant what was asked (403)


class ServerUnreachable(FlowSessionError):
    code = "server_unreachable"
    status = 503


# --- JSON -> the SDK's objects ------------------------------------------------------------

_RUN_FIELDS = [f.name for f in dataclasses.fields(Run)]
_SESSION_FIELDS = [f.name for f in dataclasses.fields(Session)]


def run_from_dict(d: Mapping[str, Any]) -> Run:
    """A ``Run`` from the API's JSON (``Run.to_dict()``; ``operator`` is not sent)."""
    values = {k: d.get(k) for k in _RUN_FIELDS}
    values["status"] = RunStatus(values["status"])
    values["tags"] = values["tags"] or {}
    values["spec"] = values["spec"] or {}
    values["errors"] = values["errors"] or []
    for k in ("total", "completed", "failed"):
        values[k] = values[k] or 0
    return Run(**values)


@dataclasses.dataclass(frozen=True)
class ServerSession(Session):
    """A ``Session`` as the server shows it: no handle (the supervisor is the server's), and
    what the handle would have told (sandbox, limits, pid, from_standby)."""

    sandbox: Any = None
    limits: Any = None
    pid: int | None = None
    from_standby: bool | None = None
    flow_missing: bool | None = None  # the server's word, not this machine's (a field here)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d.pop("handle")
        d.pop("operator")
        return d


def session_from_dict(d: Mapping[str, Any]) -> ServerSession:
    values = {k: d.get(k) for k in _SESSION_FIELDS}
    values.update(handle=None, operator=None)
    return ServerSession(**values, sandbox=d.get("sandbox"), limits=d.get("limits"),
                         pid=d.get("pid"), from_standby=d.get("from_standby"),
                         flow_missing=d.get("flow_missing"))


def error_from_dict(data: Mapping[str, Any]) -> FlowSessionError:
    """``FlowSessionError.from_dict``, keeping a code it has no class for (``interrupted``)."""
    err = FlowSessionError.from_dict(dict(data))
    code = data.get("code")
    if code and err.code != code:
        err.code = code
    return err


def error_from_response(response: httpx.Response) -> FlowSessionError:
    """The error the server answered, as its class (401 and 403: the SDK's own classes)."""
    try:
        body = response.json()
        data = dict(body["error"])
    except (ValueError, KeyError, TypeError):
        text = response.text.strip()[:300]
        return FlowSessionError(f"the server answered {response.status_code} "
                                f"{response.reason_phrase}" + (f": {text}" if text else ""),
                                hint="the server's log may say more")
    if response.status_code == 401:
        return AuthenticationError(
            "authentication failed: check your token",
            hint="pass token= to Client, or set FLOWSESSION_TOKEN; an Owner can issue one "
                 "(POST /api/users or /api/tokens)", details={"server": str(response.url)})
    if response.status_code == 403:
        data.pop("code", None)
        return PermissionDenied(data.pop("message", "forbidden"), hint=data.pop("hint", ""),
                                details=data)
    return error_from_dict(data)


# --- server-sent events --------------------------------------------------------------------

def iter_sse(response: httpx.Response) -> Iterator[tuple[str, Any]]:
    """(event, data) of a text/event-stream; data decoded from JSON."""
    event, data = "message", []
    for line in response.iter_lines():
        if not line:
            if data:
                raw = "\n".join(data)
                try:
                    yield event, json.loads(raw)
                except ValueError:
                    yield event, raw
            event, data = "message", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            event = value
        elif field == "data":
            data.append(value)


def q(part: str) -> str:
    """One path segment, escaped."""
    return quote(part, safe="")


class Http:
    """One server, one token: ``request``, ``sse``, ``wait_operation``, ``me``."""

    def __init__(self, url: str, token: str, *, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._http = httpx.Client(base_url=self.url, timeout=httpx.Timeout(timeout, connect=10),
                                  headers={"Authorization": f"Bearer {token}",
                                           "User-Agent": "flowsession-sdk"},
                                  transport=transport)
        self._me: dict[str, Any] | None = None

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, *, timeout: float | None = None,
                **kwargs: Any) -> Any:
        if timeout is not None:
            kwargs["timeout"] = httpx.Timeout(timeout, connect=10)
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        if response.status_code >= 400:
            raise error_from_response(response)
        if not response.content:
            return None
        if "json" in response.headers.get("content-type", ""):
            return response.json()
        return response.text

    def long(self, method: str, path: str, **kwargs: Any) -> Any:
        """A request that may take a while (a stop, an upload, a compute's change)."""
        return self.request(method, path, timeout=max(self.timeout, LONG_S), **kwargs)

    def _unreachable(self, exc: Exception) -> ServerUnreachable:
        if isinstance(exc, httpx.TimeoutException):
            return ServerUnreachable(f"the flowsession server at {self.url} did not answer in "
                                     f"time ({type(exc).__name__})",
                                     hint="it may be busy; try again, or check its log")
        return ServerUnreachable(f"cannot reach the flowsession server at {self.url}: {exc}",
                                 hint="start it (flowsession server), or point the client "
                                      "elsewhere (Client(url=...), FLOWSESSION_URL)")

    def sse(self, path: str, *, read_timeout: float | None) -> Iterator[tuple[str, Any]]:
        timeout = httpx.Timeout(self.timeout, connect=10, read=read_timeout)
        with self._http.stream("GET", path, timeout=timeout,
                               headers={"Accept": "text/event-stream"}) as response:
            if response.status_code >= 400:
                response.read()
                raise error_from_response(response)
            yield from iter_sse(response)

    def me(self) -> dict[str, Any]:
        if self._me is None:
            self._me = self.request("GET", "/api/me")
        return dict(self._me)

    def can(self, scope: str) -> bool:
        from flowsession.access.accounts import allows

        return allows(self.me().get("scopes", []), scope)

    def operation(self, method: str, path: str, *, on_progress: Progress = None,
                  **kwargs: Any) -> Any:
        """Start a long operation (the answer is ``202`` and the operation) and follow it to
        its end: its result, or its error raised."""
        op = self.request(method, path, **kwargs)
        return self.wait_operation(op["id"], on_event=on_progress)

    def wait_operation(self, op_id: str, *,
                       on_event: Callable[[dict[str, Any]], None] | None = None) -> Any:
        """Follow the operation's events to its end: its result, or its error raised."""
        try:
            with contextlib.closing(self.sse(f"/api/operations/{op_id}/events",
                                             read_timeout=60)) as events:
                for _, event in events:
                    if not isinstance(event, dict):
                        continue
                    kind = event.get("event")
                    if kind == OperationStatus.SUCCEEDED:
                        return event.get("result")
                    if kind == OperationStatus.FAILED:
                        raise error_from_dict(event.get("error") or {})
                    if on_event is not None and kind not in (None, "heartbeat"):
                        on_event(event)
        except httpx.TransportError:
            pass  # the stream broke: the outcome is in the operation's record
        while True:
            op = self.request("GET", f"/api/operations/{op_id}")
            if op["status"] == OperationStatus.SUCCEEDED:
                return op["result"]
            if op["status"] == OperationStatus.FAILED:
                raise error_from_dict(op["error"] or {})
            time.sleep(POLL_S)

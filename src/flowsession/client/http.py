"""The HTTP transport: the same methods, spoken to a flowsession server (``flowsession server``)
with a token.

Flows live on the server by name. A local flow folder given where a flow is expected is
uploaded once (its text files and its includes: ``client/upload.py``; name = the folder's
name) and reused afterwards; when it is already registered by you, files that differ from the
local ones are saved to it (Save only: a changed ``requirements.txt`` takes effect with
``install``). Local data files are read here
and sent inline (``data_lines``); a data path that is not a local file is taken as a file of
the flow's folder on the server. Errors come back as the ``flowsession.errors`` class of their
code."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx

from flowsession.client.http_resources import HttpResources
from flowsession.client.upload import collect_files
from flowsession.errors import Conflict, FlowSessionError, Forbidden, InvalidInput, Unauthorized
from flowsession.runs.records import ENDED, Run
from flowsession.runs.spec import RunSpec
from flowsession.sessions.records import Session

SUBMIT_TIMEOUT_S = 900.0  # a run's submission starts the flow's session when none runs
POLL_S = 0.5


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


class HttpTransport(HttpResources):
    kind = "http"

    def __init__(self, url: str, token: str, *, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None, flows_by_path: bool = False):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.flows_by_path = flows_by_path
        self._http = httpx.Client(base_url=self.url, timeout=httpx.Timeout(timeout, connect=10),
                                  headers={"Authorization": f"Bearer {token}",
                                           "User-Agent": "flowsession-sdk"},
                                  transport=transport)
        self._me: dict[str, Any] | None = None
        self._flows: dict[str, str] = {}  # a local folder -> its registered name

    def close(self) -> None:
        self._http.close()

    # --- requests --------------------------------------------------------------------------

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

    # --- flows -----------------------------------------------------------------------------

    def me(self) -> dict[str, Any]:
        if self._me is None:
            self._me = self.request("GET", "/api/me")
        return dict(self._me)

    @staticmethod
    def _local_folder(flow: str | Path) -> Path | None:
        """The flow folder ``flow`` names on this machine (the folder, or its flow YAML)."""
        path = Path(flow).expanduser()
        if path.is_file() and path.name in ("flow.dag.yaml", "flow.dag.yml", "flow.flex.yaml",
                                            "flow.flex.yml"):
            path = path.parent
        return path.resolve() if path.is_dir() else None

    def flow_arg(self, flow: str | Path | None) -> str | None:
        return None if flow is None else str(flow)

    def data_arg(self, data: str | Path | None) -> str | None:
        return None if data is None else str(data)

    def flow_name(self, flow: str | Path, *, upload: bool = True) -> str:
        """The registered name of ``flow``: a name as given, or a local folder (uploaded when
        ``upload`` and not registered yet; otherwise its folder name)."""
        folder = self._local_folder(flow)
        if folder is None:
            if isinstance(flow, Path) or "/" in str(flow) or "\\" in str(flow):
                raise InvalidInput(f"flow {flow} is not a folder on this machine, nor a "
                                   "registered flow's name",
                                   hint="give a flow folder, or the name of a flow on the "
                                        "server (GET /api/flows)", details={"flow": str(flow)})
            return str(flow)
        key = str(folder)
        if key in self._flows:
            return self._flows[key]
        if self.flows_by_path:
            name = self._flow_by_path(folder)
            if name is not None:
                self._flows[key] = name
                return name
        name = folder.name
        if not upload:
            return name
        files = collect_files(folder)
        try:
            flow_info = self.request("GET", f"/api/flows/{name}")
        except FlowSessionError as exc:
            if exc.code != "not_found":
                raise
            self.request("POST", "/api/flows", json={"name": name, "files": files},
                         timeout=max(self.timeout, 120))
        else:
            if flow_info["owner"] != self.me()["user"]:
                raise error_from_dict({
                    "code": "conflict", "message": f"flow {name!r} on the server is "
                    f"{flow_info['owner']}'s, not yours",
                    "hint": f"register the folder under another name: "
                            f"register_flow('other-name', {str(folder)!r})", "flow": name})
            if flow_info.get("uploaded"):
                self._sync(name, files, set(flow_info.get("files", [])))
        self._flows[key] = name
        return name

    def _flow_by_path(self, folder: Path) -> str | None:
        """The name of my flow registered with this folder's path, registering it when it is
        not (as the folder's name, or with a suffix when I have another flow of that name).
        None when my roles may not register folders of the server's machine (upload then)."""
        me = self.me()["user"]

        def registered() -> str | None:
            for flow in self.request("GET", "/api/flows"):
                if flow["owner"] == me and flow["path"] == str(folder):
                    return flow["name"]
            return None

        found = registered()
        if found is not None:
            return found
        base = re.sub(r"[^A-Za-z0-9_.-]", "-", folder.name).lstrip(".-") or "flow"
        digest = hashlib.sha256(str(folder).encode()).hexdigest()
        for name in (base, f"{base}-{digest[:8]}", f"{base}-{digest[:16]}"):
            try:
                self.request("POST", "/api/flows", json={"name": name, "path": str(folder)},
                             timeout=max(self.timeout, 120))
            except Forbidden:
                return None
            except Conflict:  # another flow of mine has that name (or a command running
                found = registered()  # at the same time registered this folder first)
                if found is not None:
                    return found
                continue
            return name
        raise Conflict(f"cannot register flow folder {folder}: its names are taken",
                       hint="unregister one of your flows (DELETE /api/flows/NAME)",
                       details={"flow": str(folder)})

    def _sync(self, name: str, files: dict[str, str], remote: set[str]) -> None:
        """Save the local files that differ from the registered flow's (never deletes)."""
        for rel, text in files.items():
            if rel in remote:
                current = self.request("GET", f"/api/flows/{name}/files/{rel}")["content"]
                if current == text:
                    continue
            self.request("PUT", f"/api/flows/{name}/files/{rel}", json={"content": text})

    def register_flow(self, name: str, path: str | Path, *, on_server: bool) -> dict[str, Any]:
        if on_server:
            body = {"name": name, "path": str(path)}
        else:
            folder = self._local_folder(path)
            if folder is None:
                raise InvalidInput(f"flow folder {path} does not exist",
                                   details={"flow": str(path)})
            body = {"name": name, "files": collect_files(folder)}
        flow = self.request("POST", "/api/flows", json=body, timeout=max(self.timeout, 120))
        if not on_server:
            self._flows[str(self._local_folder(path))] = name
        return flow

    def read_flow_file(self, flow: str | Path, path: str) -> str:
        name = self.flow_name(flow, upload=False)
        return self.request("GET", f"/api/flows/{name}/files/{path}")["content"]

    def write_flow_file(self, flow: str | Path, path: str, content: str) -> None:
        name = self.flow_name(flow, upload=False)
        self.request("PUT", f"/api/flows/{name}/files/{path}", json={"content": content})

    # --- operations ------------------------------------------------------------------------

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
                    if kind == "succeeded":
                        return event.get("result")
                    if kind == "failed":
                        raise error_from_dict(event.get("error") or {})
                    if on_event is not None and kind not in (None, "heartbeat"):
                        on_event(event)
        except httpx.TransportError:
            pass  # the stream broke: the outcome is in the operation's record
        while True:
            op = self.request("GET", f"/api/operations/{op_id}")
            if op["status"] == "succeeded":
                return op["result"]
            if op["status"] == "failed":
                raise error_from_dict(op["error"] or {})
            time.sleep(POLL_S)

    # --- runs ------------------------------------------------------------------------------

    def _run_body(self, spec: RunSpec) -> dict[str, Any]:
        body = spec.model_dump(exclude_defaults=True, exclude={"runtime", "flow", "data"})
        flow = spec.flow
        if not flow and spec.resume_from:  # the API needs the flow: the resumed run's
            flow = self._flow_of_run(spec.resume_from)
        if not flow:
            raise InvalidInput("a run needs a flow", hint="give flow= (a registered flow's "
                               "name, or a flow folder)", details={"field": "flow"})
        body["flow"] = self.flow_name(flow)
        if spec.data is not None:
            local = Path(spec.data).expanduser()
            if local.exists() and self.flows_by_path:  # this machine's server reads it itself
                body["data"] = str(local.resolve())
            elif local.exists():
                from flowsession.runs.data import load_data

                body["data_lines"] = load_data(local, skip_malformed=spec.skip_malformed).rows
            else:  # a file of the flow's folder on the server
                body["data"] = spec.data
        return body

    def _flow_of_run(self, name: str) -> str:
        path = self.request("GET", f"/api/runs/{name}")["flow"]
        for flow in self.request("GET", "/api/flows"):
            if flow["path"] == path:
                return flow["name"]
        raise InvalidInput(f"the flow of run {name} is not registered on the server",
                           hint="give flow= with the run", details={"run": name})

    def submit(self, spec: RunSpec, *, wait: bool,
               on_progress: Callable[[Run], None] | None) -> Run:
        answer = self.request("POST", "/api/runs", json=self._run_body(spec),
                              timeout=SUBMIT_TIMEOUT_S)
        run = run_from_dict(answer["run"])
        if not wait:
            return run
        op_id = answer["operation"]["id"]
        last = [run, None]

        def progress(event: dict[str, Any]) -> None:
            if event.get("event") != "progress":
                return
            now = (event.get("status"), event.get("total"), event.get("completed"),
                   event.get("failed"))
            if now == last[1]:
                return  # the server repeats unchanged progress
            last[1] = now
            last[0] = dataclasses.replace(last[0], status=now[0], total=now[1] or 0,
                                          completed=now[2] or 0, failed=now[3] or 0)
            if on_progress is not None:
                on_progress(last[0])

        try:
            result = self.wait_operation(op_id, on_event=progress)
        except FlowSessionError as exc:
            if exc.code != "interrupted":
                raise
            return self.stream(run.name, on_progress=on_progress, timeout=None)
        final = run_from_dict(result)
        if on_progress is not None:
            on_progress(final)
        return final

    def stream(self, name: str, *, on_progress: Callable[[Run], None] | None,
               timeout: float | None) -> Run:
        """Follow the run's events (GET /api/runs/{name}/events) to its end, or ``timeout``;
        polling when the stream breaks."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last: Run | None = None
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return self.get_run(name)
            try:
                read = 30.0 if remaining is None else max(0.1, min(30.0, remaining))
                with contextlib.closing(self.sse(f"/api/runs/{name}/events",
                                                 read_timeout=read)) as events:
                    for event, data in events:
                        if event == "end":
                            return last if last is not None else self.get_run(name)
                        if not isinstance(data, dict):
                            continue
                        last = run_from_dict(data)
                        if on_progress is not None:
                            on_progress(last)
                        if last.status in ENDED:
                            return last
                        if deadline is not None and time.monotonic() >= deadline:
                            return last
            except httpx.ReadTimeout:
                continue  # no change for a while (or the deadline): look again
            except httpx.TransportError:
                time.sleep(POLL_S)
                last = self.get_run(name)
                if on_progress is not None:
                    on_progress(last)
                if last.status in ENDED:
                    return last

    def get_run(self, name: str) -> Run:
        return run_from_dict(self.request("GET", f"/api/runs/{name}"))

    def list_runs(self, max_results: int | None) -> list[Run]:
        limit = 10000 if max_results is None else max_results
        return [run_from_dict(r) for r in self.request("GET", "/api/runs",
                                                        params={"max_results": limit})]

    def get_details(self, name: str) -> list[dict[str, Any]]:
        return self.request("GET", f"/api/runs/{name}/details")

    def get_outputs(self, name: str) -> list[dict[str, Any]]:
        return self.request("GET", f"/api/runs/{name}/outputs")

    def get_metrics(self, name: str) -> dict[str, Any]:
        return self.request("GET", f"/api/runs/{name}/metrics")

    def cancel(self, name: str) -> Run:
        return run_from_dict(self.request("POST", f"/api/runs/{name}/cancel"))

    def run_path(self, name: str) -> str | None:
        return self.request("GET", f"/api/runs/{name}").get("output_path")

    def get_logs(self, name: str) -> list[dict[str, str]]:
        return self.request("GET", f"/api/runs/{name}/logs")

    # --- sessions --------------------------------------------------------------------------

    def test(self, flow: str | Path, inputs: dict[str, Any], timeout: float,
             init: dict[str, Any] | None = None) -> dict[str, Any]:
        name = self.flow_name(flow)
        answer = self.request("POST", f"/api/flows/{name}/test",
                              json={"inputs": inputs, "timeout": timeout, "init": init or {}},
                              timeout=timeout + SUBMIT_TIMEOUT_S)
        return answer["outputs"]

    def start_session(self, flow: str | Path, options: Mapping[str, Any], *,
                      on_progress: Callable[[dict[str, Any]], None] | None = None
                      ) -> ServerSession:
        body = dict(options)
        if "idle_timeout_s" in body:  # the SDK's local spelling, in seconds
            idle = body.pop("idle_timeout_s")
            if idle is not None:
                body["idle_time"] = f"{idle:g}s"
        body = {k: v for k, v in body.items() if v is not None}
        name = self.flow_name(flow)
        op = self.request("POST", f"/api/flows/{name}/session", json=body)
        return session_from_dict(self.wait_operation(op["id"], on_event=on_progress))

    def get_session(self, flow: str | Path) -> ServerSession:
        name = self.flow_name(flow, upload=False)
        return session_from_dict(self.request("GET", f"/api/flows/{name}/session"))

    def stop_session(self, flow: str | Path) -> ServerSession:
        name = self.flow_name(flow, upload=False)
        return session_from_dict(self.request("POST", f"/api/flows/{name}/session/stop",
                                              timeout=max(self.timeout, 120)))

    def list_sessions(self, all: bool) -> list[ServerSession]:
        return [session_from_dict(d) for d in self.request(
            "GET", "/api/sessions", params={"all": "true" if all else "false"})]

    def session_events(self, flow: str | Path) -> list[dict[str, Any]]:
        return self.request("GET", f"/api/flows/{self.flow_name(flow, upload=False)}"
                                   "/session/events")

    def session_packages(self, flow: str | Path) -> list[dict[str, Any]]:
        return self.request("GET", f"/api/flows/{self.flow_name(flow, upload=False)}"
                                   "/session/packages")

    def reset_session(self, flow: str | Path, *,
                      on_progress: Callable[[dict[str, Any]], None] | None = None
                      ) -> ServerSession:
        name = self.flow_name(flow, upload=False)
        op = self.request("POST", f"/api/flows/{name}/session/reset")
        return session_from_dict(self.wait_operation(op["id"], on_event=on_progress))

    def update_session(self, flow: str | Path, changes: Mapping[str, Any]) -> ServerSession:
        body = {k: v for k, v in changes.items() if v is not None}
        name = self.flow_name(flow, upload=False)
        return session_from_dict(self.request("PATCH", f"/api/flows/{name}/session", json=body,
                                              timeout=SUBMIT_TIMEOUT_S))

    def install(self, flow: str | Path, *,
                on_progress: Callable[[dict[str, Any]], None] | None = None) -> ServerSession:
        name = self.flow_name(flow)
        op = self.request("POST", f"/api/flows/{name}/session/install")
        return session_from_dict(self.wait_operation(op["id"], on_event=on_progress))

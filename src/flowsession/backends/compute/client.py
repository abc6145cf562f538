"""The control plane's side of a session's supervisor, shared by every compute backend.

A backend gives two things: a transport (``_call``: one protocol request to the session's
supervisor, its raw answer back -- over the Unix socket for the local backend, through the
session's actor for Ray) and a way to put a snapshot where the session sees it
(``_place_flow``). Everything else is written once, here: the requests of the protocol
(``flowsession.worker.protocol``), and what their answers may carry back into the control
plane -- validated and bounded by ``boundary`` (records, log text, reasons, counts). What an
ended session left (its runs' records, the end of its log) is kept in the control plane's own
folders, handed over as data by the backend.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from flowsession.backends.compute import boundary
from flowsession.backends.compute.base import (
    BackendState,
    BackendStatus,
    RunWork,
    SessionHandle,
)
from flowsession.config import Settings
from flowsession.errors import BuildFailed, Conflict, LineFailed, SessionFailed
from flowsession.worker import protocol

MAX_SESSION_LOG = 64 * 1024 * 1024  # a session that logs more is stopped
MAX_KEPT_LOG = 1 << 20  # what is kept of an ended session's log
SESSION_ID = re.compile(r"ses-[0-9a-f]{10}")  # the control plane's ids (sessions/records.py)
AGGREGATE_TIMEOUT_S = 3600.0
STARTUP_TIMEOUT_S = 180.0
RESET_HINT = "reset the session: flowsession session reset FLOW"


class Unreachable(ConnectionError):
    """The session's supervisor (or what relays to it) gave no answer."""


class AnswerTooLong(Unreachable):
    """The supervisor's answer is longer than its request's answer can be
    (``protocol.MAX_ANSWER``): it was not read."""


class SupervisorClient:
    name: ClassVar[str]
    settings: Settings

    # --- the backend's part ------------------------------------------------------------------

    async def _call(self, handle: SessionHandle, msg: dict[str, Any],
                    timeout: float) -> dict[str, Any]:
        """One request to the session's supervisor: its answer (a JSON object), or
        Unreachable."""
        raise NotImplementedError

    async def _place_flow(self, handle: SessionHandle, snapshot: Path) -> str:
        """Put a snapshot (the control plane's) where the session sees it, read-only; the
        path the session sees."""
        raise NotImplementedError

    async def stop_session(self, handle: SessionHandle, *, reason: str = "") -> None:
        raise NotImplementedError

    # --- requests ----------------------------------------------------------------------------

    async def _request(self, handle: SessionHandle, msg: dict[str, Any], timeout: float,
                       *, failed_is: type = Conflict) -> dict[str, Any]:
        try:
            answer = await self._call(handle, msg, timeout)
        except Unreachable as exc:
            raise SessionFailed(f"the session's supervisor is not answering: {exc}",
                                hint=RESET_HINT) from None
        if answer.get("ok") is not True:
            err = answer.get("error") if isinstance(answer.get("error"), dict) else {}
            kind, message = err.get("type"), boundary.reason(err.get("message"))
            if kind in (protocol.E_SESSION_FAILED, protocol.E_STOPPED, protocol.E_LOAD_FAILED):
                raise SessionFailed(message or "the session failed", hint=RESET_HINT)
            raise failed_is(message or f"the session refused {msg.get('op')!r}")
        return answer

    @staticmethod
    def _adopt_failed(answer: dict[str, Any], log_tail: str) -> BuildFailed | None:
        """The error of an ``adopt`` that did not load the flow (None: it did)."""
        if answer.get("ok"):
            return None
        why = boundary.reason((answer.get("error") or {}).get("message")
                              if isinstance(answer.get("error"), dict) else None)
        return BuildFailed(f"the flow failed to load in its session: {why}",
                           hint="fix the flow's code or requirements, then start again "
                                "(flowsession session logs shows the session's log)",
                           log_tail=log_tail)

    async def test_line(self, handle: SessionHandle, inputs: Mapping[str, Any], *,
                        timeout: float, connections: Mapping[str, Any] | None = None,
                        init: Mapping[str, Any] | None = None, with_trace: bool = False
                        ) -> dict[str, Any]:
        """The line's outputs; ``with_trace``: ``{"outputs", "trace", "duration"}``, the trace
        (each node's inputs, output, status, duration) checked as session data."""
        msg: dict[str, Any] = {"op": "test", "inputs": dict(inputs), "timeout": timeout}
        if connections is not None:
            msg["connections"] = dict(connections)
        if init is not None:
            msg["init"] = dict(init)
        try:
            answer = await self._call(handle, msg, timeout + 30)
        except AnswerTooLong as exc:
            raise LineFailed(f"the line's output is too large to send: {exc}",
                             hint="the session is still running; return less") from None
        except Unreachable as exc:
            raise SessionFailed(f"the session's supervisor is not answering: {exc}",
                                hint=RESET_HINT) from None
        if answer.get("ok") is True and isinstance(answer.get("output"), dict):
            if with_trace:
                return {"outputs": answer["output"], "trace": boundary.trace(answer.get("trace")),
                        "duration": boundary.seconds(answer.get("duration"))}
            return answer["output"]
        err = answer.get("error") if isinstance(answer.get("error"), dict) else {}
        kind, message = err.get("type"), boundary.text(err.get("message"), boundary.MAX_ERROR)
        if kind == protocol.E_SESSION_FAILED:
            raise SessionFailed(message, hint=RESET_HINT)
        if kind == protocol.E_WORKER_DIED:
            raise LineFailed(message, hint="the session is still running; its log has the "
                             "whole traceback: flowsession session logs FLOW",
                             details={"worker_died": True})
        if kind in (protocol.E_LINE_FAILED, protocol.E_TIMEOUT):
            raise LineFailed(message if kind == protocol.E_LINE_FAILED
                             else f"the line timed out: {message}",
                             hint="the session is still running; fix the inputs or the flow")
        raise SessionFailed(message or "the session gave no answer to the line")

    async def reload(self, handle: SessionHandle, snapshot: Path) -> None:
        """Load a changed flow: fresh workers on the new snapshot (lines running finish first)."""
        flow_inside = await self._place_flow(handle, snapshot)
        await self._request(handle, {"op": "reload", "flow": flow_inside}, STARTUP_TIMEOUT_S,
                            failed_is=SessionFailed)

    async def configure(self, handle: SessionHandle, *, idle_timeout_s: float) -> None:
        await self._request(handle, {"op": "configure", "idle_timeout": idle_timeout_s}, 10.0,
                            failed_is=SessionFailed)

    # --- status --------------------------------------------------------------------------------

    @staticmethod
    def _ended(exit_info: Mapping[str, Any] | None, failed: Mapping[str, Any] | None,
               last_line: str) -> BackendStatus:
        """The status of a session whose supervisor is gone, from what it left (data)."""
        if exit_info:
            why = boundary.reason(exit_info.get("reason") or "ended")
            if why == "idle":
                idle = exit_info.get("idle_seconds")
                idle = idle if type(idle) in (int, float) and 0 <= idle < 1e9 else 0
                why = f"idle for {idle:.0f} s: the session ended itself"
            return BackendStatus(BackendState.EXITED, detail=why)
        detail = boundary.reason((failed or {}).get("error") or last_line)
        return BackendStatus(BackendState.LOST, detail=f"the supervisor is gone"
                             f"{': ' + detail if detail else ''}")

    async def _live(self, handle: SessionHandle, log_size: int) -> BackendStatus:
        """The status of a session whose supervisor runs: a flooded log stops it; else its
        answer to ``ping``."""
        if log_size > MAX_SESSION_LOG:
            why = (f"the session wrote more than {MAX_SESSION_LOG // (1024 * 1024)} MB to its "
                   "log: it was stopped")
            await self.stop_session(handle, reason=why)
            return BackendStatus(BackendState.EXITED, detail=why)
        try:
            ping = await self._call(handle, {"op": "ping"}, 5.0)
        except Unreachable as exc:
            return BackendStatus(BackendState.STARTING, detail=f"not answering: {exc}")
        phase = ping.get("phase")
        if phase == protocol.Phase.FAILED:
            return BackendStatus(BackendState.RUNNING, failed=True,
                                 detail=boundary.reason(ping.get("error") or "failed"))
        state = BackendState.RUNNING if phase == protocol.Phase.READY else BackendState.STARTING
        busy, idle = ping.get("busy"), ping.get("idle_seconds")
        return BackendStatus(state, detail=boundary.reason(phase or ""),
                             note=boundary.reason(ping.get("last_worker_death") or ""),
                             busy=busy if type(busy) is int and busy >= 0 else 0,
                             idle_seconds=float(idle) if type(idle) in (int, float)
                             and 0 <= idle < 1e12 else 0.0)

    # --- batch runs: the lines go to the supervisor as data, records come back as data ------

    async def _run_msg(self, handle: SessionHandle, work: RunWork) -> dict[str, Any]:
        msg: dict[str, Any] = {
            "id": work.run_id, "workers": work.workers, "line_timeout": work.line_timeout,
            "env": dict(work.env), "connections": dict(work.connections),
            "init": dict(work.init), "node_override": dict(work.node_override),
            "inputs": work.inputs.decode()}
        if work.concurrency:
            msg["concurrency"] = work.concurrency
        if work.flow:
            msg["flow"] = await self._place_flow(handle, Path(work.flow))
        return msg

    async def submit_run(self, handle: SessionHandle, work: RunWork) -> dict[str, Any]:
        msg = {"op": "run", **await self._run_msg(handle, work),
               "lines": list(work.lines) if work.lines is not None else None}
        answer = await self._request(handle, msg, 120.0)
        return boundary.run_progress(answer.get("run")) or {"state": protocol.RunState.FAILED,
                                                            "error": "no status"}

    async def run_status(self, handle: SessionHandle, run_id: str) -> dict[str, Any] | None:
        try:
            answer = await self._request(handle, {"op": "run_status", "id": run_id}, 10.0)
        except (SessionFailed, Conflict):
            return None
        return boundary.run_progress(answer.get("run"))

    async def cancel_run(self, handle: SessionHandle, run_id: str) -> None:
        with contextlib.suppress(SessionFailed, Conflict):
            await self._request(handle, {"op": "run_cancel", "id": run_id}, 30.0)

    async def forget_run(self, handle: SessionHandle | None, run_id: str) -> None:
        """The run's results are stored: the session may drop its copy, and so may we."""
        if handle is not None:
            with contextlib.suppress(SessionFailed, Conflict):
                await self._request(handle, {"op": "run_forget", "id": run_id}, 30.0)
        for path in self._salvaged(run_id):
            with contextlib.suppress(OSError):
                path.unlink()

    async def aggregate_run(self, handle: SessionHandle, work: RunWork,
                            records: bytes) -> dict[str, Any]:
        """The aggregation nodes over ``records`` (the run's stored records, JSON lines)."""
        msg = {"op": "aggregate", **await self._run_msg(handle, work),
               "records": records.decode()}
        answer = await self._request(handle, msg, AGGREGATE_TIMEOUT_S)
        metrics = answer.get("metrics") if isinstance(answer.get("metrics"), dict) else {}
        error = answer.get("error")
        return {"aggregated": answer.get("aggregated") is True, "metrics": metrics,
                "error": boundary.text(error, boundary.MAX_ERROR) if error else None}

    async def collect(self, handle: SessionHandle | None, run_id: str,
                      cursor: Mapping[str, int], *, total: int) -> boundary.Collected:
        """The run's records and worker logs past ``cursor``: from the live session, else
        what was kept of the sessions it ran on. Validated and bounded."""
        new_cursor = dict(cursor)
        raw: list[Any] = []
        logs: dict[str, str] = {}
        more = False
        if handle is not None:
            key = self._key(handle) + ":"
            mine = {k[len(key):]: v for k, v in cursor.items() if k.startswith(key)}
            try:
                answer = await self._request(handle, {"op": "collect", "id": run_id,
                                                      "cursor": mine,
                                                      "max_bytes": boundary.MAX_COLLECT}, 60.0)
            except (SessionFailed, Conflict):
                answer = {}
            got = answer.get("cursor") if isinstance(answer.get("cursor"), dict) else {}
            room = boundary.MAX_CURSOR_KEYS - len(mine)  # a session names so many files, no more
            for k, v in got.items():
                if isinstance(k, str) and type(v) is int and v >= 0 and len(k) < 300:
                    if key + k not in new_cursor:
                        if room <= 0:
                            continue
                        room -= 1
                    new_cursor[key + k] = v
            raw = answer.get("records") if isinstance(answer.get("records"), list) else []
            got_logs = answer.get("logs") if isinstance(answer.get("logs"), dict) else {}
            for k, v in list(got_logs.items())[:boundary.MAX_LOG_NAMES]:
                logs[boundary.text(k, 40, one_line=True)] = boundary.text(v, 1 << 20)
            more = answer.get("more") is True
        for path in self._salvaged(run_id):
            key = f"salvage:{path.parent.name}"
            start = int(new_cursor.get(key, 0))
            with open(path, "rb") as f:
                f.seek(start)
                data = f.read(boundary.MAX_COLLECT)
            end = data.rfind(b"\n") + 1
            raw += data[:end].split(b"\n")[:-1]
            new_cursor[key] = start + end
            more = more or end < len(data)
        records, refused = [], 0
        for item in raw[:200_000]:
            rec = boundary.record(item.encode() if isinstance(item, str) else item, total)
            if rec is None:
                refused += 1
            else:
                records.append(rec)
        return boundary.Collected(records=records, logs=logs, cursor=new_cursor, more=more,
                                  refused=refused)

    # --- what is kept of an ended session, in the control plane's own folders ---------------

    @staticmethod
    def _key(handle: SessionHandle) -> str:
        return Path(handle.slot).name

    def _salvaged(self, run_id: str) -> list[Path]:
        return sorted(self.settings.salvage_dir.glob(f"*/{run_id}.jsonl"))

    def _keep_salvage(self, handle: SessionHandle, runs: Mapping[str, list[bytes]]) -> None:
        """The records an ended session's runs wrote and nobody collected yet (complete
        lines, each checked again when collected)."""
        target = self.settings.salvage_dir / self._key(handle)
        for run_id, lines in runs.items():
            if not lines or "/" in run_id or run_id.startswith("."):
                continue
            target.mkdir(parents=True, exist_ok=True)
            with open(target / f"{run_id}.jsonl", "ab") as f:
                f.write(b"\n".join(line for line in lines if b"\n" not in line) + b"\n")

    def _kept_log_path(self, handle: SessionHandle) -> Path:
        """Kept by the session's id (``ended_log`` finds it once the record has no handle);
        a standby's or an orphan's, by its slot."""
        key = handle.session_id if SESSION_ID.fullmatch(handle.session_id) else self._key(handle)
        return self.settings.logs_dir / "sessions" / f"{key}.log"

    def _keep_log(self, handle: SessionHandle, data: bytes | None) -> None:
        """The end of an ended session's log, kept (bounded) for ``session logs``."""
        if data is None:
            return
        target = self._kept_log_path(handle)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data[-MAX_KEPT_LOG:])

    async def ended_log(self, session_id: str, *, tail_bytes: int = 256 * 1024) -> str:
        if not SESSION_ID.fullmatch(session_id):
            return ""
        return self._read_kept(self.settings.logs_dir / "sessions" / f"{session_id}.log",
                               tail_bytes)

    def _kept_log(self, handle: SessionHandle, tail_bytes: int) -> str:
        return self._read_kept(self._kept_log_path(handle), tail_bytes)

    @staticmethod
    def _read_kept(path: Path, tail_bytes: int) -> str:
        with boundary.open_dir(path.parent) as d:
            got = boundary.read_file(d, path.name, limit=tail_bytes, tail=True) if d else None
        return boundary.text(got[0], tail_bytes) if got else ""


async def over_socket(socket_path: str, msg: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One request over a supervisor's socket, without a thread waiting on the session
    (``protocol.arequest``: its answer bounded by the request's kind); OSError and
    ProtocolError as Unreachable, an answer over its bound as AnswerTooLong."""
    try:
        return await protocol.arequest(socket_path, msg, timeout)
    except protocol.AnswerTooLong as exc:
        raise AnswerTooLong(str(exc)) from None
    except (OSError, protocol.ProtocolError) as exc:
        raise Unreachable(str(exc) or type(exc).__name__) from None

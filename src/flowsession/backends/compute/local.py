"""The local compute backend: sessions as processes on this machine.

A compute is a resource group (cgroup v2 or v1 where the host allows, otherwise rlimits) sized
by its VM size. A session is a supervisor process (``flowsession.worker.supervisor``) in the
flow's environment plus the warm workers it forks, run under bubblewrap where available: the
environment and the flow read-only, a private working directory, no view of other sessions'
files, the control plane's database or its secrets.

Each session has a *slot*: ``<runtime>/slots/<id>/{flow,work,state}``. Inside the sandbox the
slot is ``/session``: ``flow`` read-only, ``work`` and ``state`` writable by the session -- and so
by its flow's code, which is hostile. The control plane never follows a path there and never
writes there: what it needs from a session comes over the supervisor's socket as data, or, once
the session has ended, is read with ``boundary`` (no symlink followed, regular files only,
bounded). What is the control plane's own lives in ``<runtime>/control/<id>/``, which no session
sees: the supervisor's socket (bound here and handed to the supervisor as a descriptor, so a
session cannot replace it) and the session's log (the supervisor's stdout and stderr; the
session can only append to it, and is stopped when it floods it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import flowsession

from flowsession.backends.compute import boundary, procs, sandbox
from flowsession.backends.compute.base import (
    BackendState,
    BackendStatus,
    ComputeHandle,
    ComputeSpec,
    EnvHandle,
    RunWork,
    SessionHandle,
    SessionSpec,
)
from flowsession.backends.compute.limits import Limits, LimitsError
from flowsession.config import Settings
from flowsession.errors import BuildFailed, Conflict, LineFailed, SessionFailed
from flowsession.worker import protocol

INSIDE = "/session"  # the slot, as the sandboxed session sees it
RUNS = "runs"  # the runs' folders, under the slot's state/
SOCKET, SESSION_LOG = "s.sock", "session.log"  # in the control dir
MAX_SESSION_LOG = 64 * 1024 * 1024  # a session that logs more is stopped
MAX_SALVAGE = 256 * 1024 * 1024  # what is rescued of an ended session's run, at most
MAX_FILE = 4 * 1024 * 1024 * 1024  # RLIMIT_FSIZE of a session's processes
AGGREGATE_TIMEOUT_S = 3600.0
PACKAGE_INSIDE = "/opt/flowsession"  # where flowsession.worker is importable inside
STARTUP_TIMEOUT_S = 180.0


class LocalBackend:
    name: ClassVar[str] = "local"

    def __init__(self, settings: Settings, *, limits: Limits | None = None,
                 use_sandbox: bool | None = None):
        self.settings = settings
        self._limits = limits
        self.bwrap = sandbox.bwrap_path() if use_sandbox in (None, True) else None

    @property
    def limits(self) -> Limits:
        if self._limits is None:  # detecting probes /sys/fs/cgroup: only when first needed
            self._limits = Limits()
        return self._limits

    # --- computes ----------------------------------------------------------------------------

    async def provision(self, compute: ComputeSpec) -> ComputeHandle:
        handle = await asyncio.to_thread(self.limits.create, compute.id, compute.size.vcpu,
                                         compute.size.memory_bytes)
        return ComputeHandle(backend=self.name, compute_id=compute.id, limits=handle,
                             vcpu=compute.size.vcpu, memory_bytes=compute.size.memory_bytes)

    async def release(self, handle: ComputeHandle) -> None:
        await asyncio.to_thread(self.limits.destroy, dict(handle.limits))

    # --- sessions ----------------------------------------------------------------------------

    def _control(self, slot: str | Path) -> Path:
        """The control plane's own folder for a slot (no session sees it)."""
        return self.settings.runtime_dir / "control" / Path(slot).name

    async def start_standby(self, env: EnvHandle, *, idle_timeout_s: float) -> SessionHandle:
        """Spawn a supervisor in standby; returns at once (it imports the runtime meanwhile)."""
        slot_id = f"s{uuid.uuid4().hex[:10]}"
        slot = self.settings.runtime_dir / "slots" / slot_id
        for sub in ("flow", "work", "state"):
            (slot / sub).mkdir(parents=True, exist_ok=True)
        for path in env.read_only_paths:  # the images and environments dirs: bind sources
            Path(path).mkdir(parents=True, exist_ok=True)
        os.chmod(slot, 0o700)
        control = self._control(slot)
        control.mkdir(parents=True, exist_ok=True)
        os.chmod(control.parent, 0o700)
        os.chmod(control, 0o700)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        log = os.open(control / SESSION_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            with protocol.socket_address(control / SOCKET) as address:
                listener.bind(address)
            listener.listen(64)
            inside = INSIDE if self.bwrap else str(slot)
            argv = [env.python, "-m", "flowsession.worker.supervisor",
                    "--listen-fd", str(listener.fileno()), "--log-inherit",
                    "--state-dir", f"{inside}/state", "--standby",
                    "--idle-timeout", str(idle_timeout_s)]
            argv, environ = self._sandboxed(argv, env, slot)
            # every file a session writes is bounded (a flood of results or logs stops at it)
            argv = ["/bin/sh", "-c", 'ulimit -f "$1"; shift; exec "$@"', "flowsession-fsize",
                    str(MAX_FILE // 512), *argv]
            proc = subprocess.Popen(argv, env=environ, cwd=slot / "work", start_new_session=True,
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    pass_fds=(listener.fileno(),))
        finally:
            listener.close()
            os.close(log)
        return SessionHandle(
            backend=self.name, session_id=slot_id, pid=proc.pid,
            pid_start=procs.start_time(proc.pid) or "", socket=str(control / SOCKET),
            slot=str(slot), sandboxed=self.bwrap is not None,
            sandbox_detail=sandbox.describe(self.bwrap is not None), limits_detail="",
            from_standby=False)

    def alive(self, handle: SessionHandle) -> bool:
        """Is the session's top process still there (not a reused pid)?"""
        return procs.alive(handle.pid, handle.pid_start)

    def orphans(self, known: set[str]) -> list[SessionHandle]:
        """Supervisors no session or standby refers to (``known``: their slots): left
        by a control plane that died between starting one and recording it. Found by their
        command line (it names the slot), so even one whose handle was never written is
        found."""
        slots_dir = str(self.settings.runtime_dir / "slots") + "/"
        by_slot: dict[str, list[int]] = {}
        for pid, arg in procs.with_argument_under(slots_dir).items():
            name = arg[len(slots_dir):].split("/", 1)[0]
            if _SLOT_ID.match(name):  # flow code can name its processes anything ("..")
                by_slot.setdefault(slots_dir + name, []).append(pid)
        # ... and run them inside a session we know: nothing below a known session is an orphan
        ours = {pid for slot, pids in by_slot.items() if slot in known for pid in pids}
        parents = self._parents() if ours else {}
        found = []
        for slot, pids in sorted(by_slot.items()):
            pids = [p for p in pids if not _descends(p, ours, parents)]
            if slot in known or not pids:
                continue
            top = min(pids)  # the launcher (bwrap, or the supervisor itself) started first
            found.append(SessionHandle(
                backend=self.name, session_id=Path(slot).name, pid=top,
                pid_start=procs.start_time(top) or "",
                socket=str(self._control(slot) / SOCKET), slot=slot,
                sandboxed=self.bwrap is not None, sandbox_detail="", limits_detail=""))
        return found

    async def start_session(self, compute: ComputeHandle, env: EnvHandle, spec: SessionSpec,
                            *, standby: SessionHandle | None = None) -> SessionHandle:
        if standby is None:
            standby = await self.start_standby(env, idle_timeout_s=spec.idle_timeout_s)
        try:
            self._join_limits(compute, standby)
            flow_inside = self._place_flow(standby, Path(spec.flow_dir))
            sites = await asyncio.to_thread(self._place_env, standby, env)
            await self._wait_for(standby, {protocol.Phase.STANDBY}, STARTUP_TIMEOUT_S)
            answer = await protocol.arequest(standby.socket, {
                "op": "adopt", "flow": flow_inside, "site_dirs": sites,
                "idle_timeout": spec.idle_timeout_s, "workers": spec.workers,
                "env": dict(spec.env_vars), "connections": dict(spec.connections)},
                STARTUP_TIMEOUT_S)
            if not answer.get("ok"):
                why = boundary.reason((answer.get("error") or {}).get("message"))
                raise BuildFailed(f"the flow failed to load in its session: {why}",
                                  hint="fix the flow's code or requirements, then start again "
                                       "(flowsession session logs shows the session's log)",
                                  log_tail=self._log_tail(standby, 20))
        except BaseException:
            await self.stop_session(standby, reason="start failed")
            raise
        return replace(standby, session_id=spec.session_id,
                       limits_detail=Limits.describe(dict(compute.limits)))

    async def stop_session(self, handle: SessionHandle, *, reason: str = "") -> None:
        if procs.alive(handle.pid, handle.pid_start):
            try:
                await protocol.arequest(handle.socket,
                                        {"op": "shutdown", "reason": reason or "stopped"}, 5.0)
            except (OSError, protocol.ProtocolError):
                pass
            deadline = time.monotonic() + 5
            while procs.alive(handle.pid, handle.pid_start) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            for pid in [*self.process_tree(handle), handle.pid]:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.killpg(handle.pid, signal.SIGKILL)  # the session's own process group
        await asyncio.to_thread(self._salvage_runs, handle)
        await asyncio.to_thread(self._keep_log, handle)
        await asyncio.to_thread(shutil.rmtree, handle.slot, True)
        await asyncio.to_thread(shutil.rmtree, self._control(handle.slot), True)

    async def status(self, handle: SessionHandle) -> BackendStatus:
        if not procs.alive(handle.pid, handle.pid_start):
            with boundary.open_dir(Path(handle.slot) / "state") as state:
                ended = boundary.read_json(state, protocol.EXIT_FILE)
                failed = boundary.read_json(state, protocol.STATUS_FILE) or {}
            if ended:
                why = boundary.reason(ended.get("reason") or "ended")
                if why == "idle":
                    idle = ended.get("idle_seconds")
                    idle = idle if type(idle) in (int, float) and 0 <= idle < 1e9 else 0
                    why = f"idle for {idle:.0f} s: the session ended itself"
                return BackendStatus(BackendState.EXITED, detail=why)
            detail = boundary.reason(failed.get("error") or self._log_tail(handle, 1))
            return BackendStatus(BackendState.LOST, detail=f"the supervisor is gone"
                                 f"{': ' + detail if detail else ''}")
        flooded = self._log_size(handle) > MAX_SESSION_LOG
        if flooded:
            why = (f"the session wrote more than {MAX_SESSION_LOG // (1024 * 1024)} MB to its "
                   "log: it was stopped")
            await self.stop_session(handle, reason=why)
            return BackendStatus(BackendState.EXITED, detail=why)
        try:
            ping = await protocol.arequest(handle.socket, {"op": "ping"}, 5.0)
        except (OSError, protocol.ProtocolError) as exc:
            return BackendStatus(BackendState.STARTING, detail=f"not answering: {exc}")
        phase = ping.get("phase")
        if phase == protocol.Phase.FAILED:
            return BackendStatus(BackendState.RUNNING, failed=True,
                                 detail=boundary.reason(ping.get("error") or "failed"))
        state = BackendState.RUNNING if phase == protocol.Phase.READY else BackendState.STARTING
        busy, idle = ping.get("busy"), ping.get("idle_seconds")
        return BackendStatus(state, detail=boundary.reason(phase or ""),
                             busy=busy if type(busy) is int and busy >= 0 else 0,
                             idle_seconds=float(idle) if type(idle) in (int, float)
                             and 0 <= idle < 1e12 else 0.0)

    async def logs(self, handle: SessionHandle, *, tail_bytes: int = 256 * 1024) -> str:
        """The session's log (its supervisor's and workers' output): the last
        ``tail_bytes``, as text."""
        path = self._log_path(handle)
        with boundary.open_dir(path.parent) as d:
            got = boundary.read_file(d, path.name, limit=tail_bytes, tail=True) if d else None
        return boundary.text(got[0], tail_bytes) if got else ""

    async def test_line(self, handle: SessionHandle, inputs: Mapping[str, Any], *,
                        timeout: float, connections: Mapping[str, Any] | None = None,
                        init: Mapping[str, Any] | None = None) -> dict[str, Any]:
        msg: dict[str, Any] = {"op": "test", "inputs": dict(inputs), "timeout": timeout}
        if connections is not None:
            msg["connections"] = dict(connections)
        if init is not None:
            msg["init"] = dict(init)
        try:
            answer = await protocol.arequest(handle.socket, msg,
                                             timeout + 30)
        except protocol.AnswerTooLong as exc:
            raise LineFailed(f"the line's output is too large to send: {exc}",
                             hint="the session is still running; return less") from None
        except (OSError, protocol.ProtocolError) as exc:
            raise SessionFailed(f"the session's supervisor is not answering: {exc}",
                                hint="reset the session: flowsession session reset FLOW") from None
        if answer.get("ok") is True and isinstance(answer.get("output"), dict):
            return answer["output"]
        err = answer.get("error") if isinstance(answer.get("error"), dict) else {}
        kind, message = err.get("type"), boundary.text(err.get("message"), boundary.MAX_ERROR)
        if kind == protocol.E_SESSION_FAILED:
            raise SessionFailed(message, hint="reset the session: flowsession session reset FLOW")
        if kind in (protocol.E_LINE_FAILED, protocol.E_TIMEOUT):
            raise LineFailed(message if kind == protocol.E_LINE_FAILED
                             else f"the line timed out: {message}",
                             hint="the session is still running; fix the inputs or the flow")
        raise Conflict(message or "the session gave no answer to the line")

    async def reload(self, handle: SessionHandle, snapshot: Path) -> None:
        """Load a changed flow: fresh workers on the new snapshot (lines running finish first)."""
        flow_inside = self._place_flow(handle, snapshot)
        answer = await self._request(handle, {"op": "reload", "flow": flow_inside},
                                     STARTUP_TIMEOUT_S, failed_is=SessionFailed)
        del answer

    async def configure(self, handle: SessionHandle, *, idle_timeout_s: float) -> None:
        await protocol.arequest(handle.socket,
                                {"op": "configure", "idle_timeout": idle_timeout_s}, 10.0)

    # --- batch runs: the lines go to the supervisor as data, records come back as data ------

    async def _request(self, handle: SessionHandle, msg: dict[str, Any], timeout: float,
                       *, failed_is: type = Conflict) -> dict[str, Any]:
        try:
            answer = await protocol.arequest(handle.socket, msg, timeout)
        except (OSError, protocol.ProtocolError) as exc:
            raise SessionFailed(f"the session's supervisor is not answering: {exc}",
                                hint="reset the session: flowsession session reset FLOW") from None
        if answer.get("ok") is not True:
            err = answer.get("error") if isinstance(answer.get("error"), dict) else {}
            kind, message = err.get("type"), boundary.reason(err.get("message"))
            if kind in (protocol.E_SESSION_FAILED, protocol.E_STOPPED, protocol.E_LOAD_FAILED):
                raise SessionFailed(message or "the session failed",
                                    hint="reset the session: flowsession session reset FLOW")
            raise failed_is(message or f"the session refused {msg.get('op')!r}")
        return answer

    def _run_msg(self, handle: SessionHandle, work: RunWork) -> dict[str, Any]:
        msg: dict[str, Any] = {
            "id": work.run_id, "workers": work.workers, "line_timeout": work.line_timeout,
            "env": dict(work.env), "connections": dict(work.connections),
            "init": dict(work.init), "node_override": dict(work.node_override),
            "inputs": work.inputs.decode()}
        if work.flow:
            msg["flow"] = self._place_flow(handle, Path(work.flow))
        return msg

    async def submit_run(self, handle: SessionHandle, work: RunWork) -> dict[str, Any]:
        msg = {"op": "run", **self._run_msg(handle, work),
               "lines": list(work.lines) if work.lines is not None else None}
        answer = await self._request(handle, msg, 120.0)
        return boundary.run_progress(answer.get("run")) or {"state": protocol.RunState.FAILED,
                                                            "error": "no status"}

    async def run_status(self, handle: SessionHandle, run_id: str) -> dict[str, Any] | None:
        if not procs.alive(handle.pid, handle.pid_start):
            return None
        try:
            answer = await self._request(handle, {"op": "run_status", "id": run_id}, 10.0)
        except (SessionFailed, Conflict):
            return None
        return boundary.run_progress(answer.get("run"))

    async def cancel_run(self, handle: SessionHandle, run_id: str) -> None:
        if procs.alive(handle.pid, handle.pid_start):
            with contextlib.suppress(SessionFailed, Conflict):
                await self._request(handle, {"op": "run_cancel", "id": run_id}, 10.0)

    async def forget_run(self, handle: SessionHandle, run_id: str) -> None:
        """The run's results are stored: the session may drop its copy."""
        if procs.alive(handle.pid, handle.pid_start):
            with contextlib.suppress(SessionFailed, Conflict):
                await self._request(handle, {"op": "run_forget", "id": run_id}, 30.0)
        for path in self._salvaged(run_id):
            with contextlib.suppress(OSError):
                path.unlink()

    async def aggregate_run(self, handle: SessionHandle, work: RunWork,
                            records: bytes) -> dict[str, Any]:
        """The aggregation nodes over ``records`` (the run's stored records, JSON lines)."""
        msg = {"op": "aggregate", **self._run_msg(handle, work), "records": records.decode()}
        answer = await self._request(handle, msg, AGGREGATE_TIMEOUT_S)
        metrics = answer.get("metrics") if isinstance(answer.get("metrics"), dict) else {}
        error = answer.get("error")
        return {"aggregated": answer.get("aggregated") is True, "metrics": metrics,
                "error": boundary.text(error, boundary.MAX_ERROR) if error else None}

    async def collect(self, handle: SessionHandle | None, run_id: str,
                      cursor: Mapping[str, int], *, total: int) -> boundary.Collected:
        """The run's records and worker logs past ``cursor``: from the live session over its
        socket, else what was salvaged of the sessions it ran on. Validated and bounded."""
        new_cursor = dict(cursor)
        raw: list[Any] = []
        logs: dict[str, str] = {}
        more = False
        if handle is not None and procs.alive(handle.pid, handle.pid_start):
            key = Path(handle.slot).name + ":"
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

    # --- what is kept of an ended session ------------------------------------------------------

    def _salvaged(self, run_id: str) -> list[Path]:
        return sorted(self.settings.salvage_dir.glob(f"*/{run_id}.jsonl"))

    def _salvage_runs(self, handle: SessionHandle) -> None:
        """The records the session's runs wrote and nobody collected yet, rescued into the
        control plane's own folder before the slot goes. The session has ended (every
        process of it is dead), so nothing changes under us; still, nothing there is
        followed: a planted symlink, FIFO or device is skipped, and at most MAX_SALVAGE
        bytes of a run are read."""
        target = self.settings.salvage_dir / Path(handle.slot).name
        with boundary.open_dir(Path(handle.slot) / "state") as state:
            if state is None:
                return
            with boundary.open_dir(RUNS, at=state) as runs:
                if runs is None:
                    return
                for run_id in boundary.entries(runs):
                    if _RUN_ID.match(run_id):
                        with boundary.open_dir(run_id, at=runs) as run:
                            out = _complete_records(run) if run is not None else []
                        if out:
                            target.mkdir(parents=True, exist_ok=True)
                            with open(target / f"{run_id}.jsonl", "ab") as f:
                                f.write(b"\n".join(out) + b"\n")

    def _log_path(self, handle: SessionHandle) -> Path:
        live = self._control(handle.slot) / SESSION_LOG
        return live if live.exists() else self.settings.logs_dir / "sessions" / \
            f"{Path(handle.slot).name}.log"

    def _log_size(self, handle: SessionHandle) -> int:
        try:
            return (self._control(handle.slot) / SESSION_LOG).stat().st_size
        except OSError:
            return 0

    def _log_tail(self, handle: SessionHandle, lines: int) -> str:
        path = self._log_path(handle)
        with boundary.open_dir(path.parent) as d:
            return boundary.tail_text(d, path.name, lines=lines)

    def _keep_log(self, handle: SessionHandle) -> None:
        """The end of an ended session's log, kept (bounded) for ``session logs``."""
        src = self._control(handle.slot) / SESSION_LOG
        with boundary.open_dir(src.parent) as d:
            got = boundary.read_file(d, src.name, limit=1 << 20, tail=True) if d else None
        if got is None:
            return
        target = self.settings.logs_dir / "sessions" / f"{Path(handle.slot).name}.log"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(got[0])

    # --- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _parents() -> dict[int, int]:
        """pid -> parent pid of every process (host pids)."""
        parents = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                parents[int(entry)] = int(stat[1])
        return parents

    def process_tree(self, handle: SessionHandle) -> list[int]:
        """The session's processes below its top pid (supervisor and workers), host pids."""
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                children.setdefault(int(stat[1]), []).append(int(entry))
        out, todo = [], [handle.pid]
        while todo:
            for child in children.get(todo.pop(), []):
                out.append(child)
                todo.append(child)
        return out

    def _join_limits(self, compute: ComputeHandle, handle: SessionHandle) -> None:
        """Move the session's processes into the compute's limits; workers forked later
        inherit them."""
        for pid in [handle.pid, *self.process_tree(handle)]:
            try:
                self.limits.add_process(dict(compute.limits), pid)
            except (LimitsError, ProcessLookupError):
                if procs.alive(handle.pid, handle.pid_start):
                    raise

    def _place_flow(self, handle: SessionHandle, snapshot: Path) -> str:
        """Copy a snapshot (the control plane's) into the slot's flow folder, which the
        session sees read-only; its path inside."""
        target = Path(handle.slot) / "flow" / snapshot.name
        if not target.exists():
            tmp = target.with_name(f".{target.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(snapshot, tmp, symlinks=True)
            os.rename(tmp, target)
        return f"{INSIDE}/flow/{snapshot.name}" if handle.sandboxed else str(target)

    def _place_env(self, handle: SessionHandle, env: EnvHandle) -> list[str]:
        """The environment's own packages, linked into the slot's read-only folder: a session
        sees its environment and no other (another user's private packages stay his). Hard
        links where the slot and the environment share a file system, else copies."""
        inside = []
        for i, site in enumerate(env.site_dirs):
            target = Path(handle.slot) / "flow" / f".env-{env.env_id}-{i}"
            if not target.exists():
                tmp = target.with_name(f"{target.name}.tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(site, tmp, symlinks=True, copy_function=_link_or_copy)
                os.rename(tmp, target)
            inside.append(f"{INSIDE}/flow/{target.name}" if handle.sandboxed else str(target))
        return inside

    async def _wait_for(self, handle: SessionHandle, phases: set[str], timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            if not procs.alive(handle.pid, handle.pid_start):
                raise BuildFailed("the session's supervisor exited while starting",
                                  hint="see its log: flowsession session logs",
                                  log_tail=self._log_tail(handle, 5))
            try:
                ping = await protocol.arequest(handle.socket, {"op": "ping"}, 5)
                if ping.get("phase") in phases:
                    return ping
                if ping.get("phase") == protocol.Phase.FAILED:
                    raise BuildFailed(f"the session failed to start: "
                                      f"{boundary.reason(ping.get('error'))}")
            except (OSError, protocol.ProtocolError):
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise BuildFailed(f"the session did not start within {timeout:.0f} s")
            await asyncio.sleep(0.01)

    def _sandboxed(self, argv: list[str], env: EnvHandle, slot: Path
                   ) -> tuple[list[str], dict[str, str]]:
        package_root = str(Path(flowsession.__file__).resolve().parent.parent)
        base_env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
                    "PF_DISABLE_TRACING": "true", "PYTHONDONTWRITEBYTECODE": "1",
                    "PYTHONUNBUFFERED": "1"}
        if self.bwrap is None:
            environ = {**base_env, "HOME": str(slot / "work"), "PYTHONPATH": package_root}
            return argv, environ
        box = sandbox.Sandbox(
            ro_binds=[(p, p) for p in (*env.read_only_paths,
                                       *sandbox.interpreter_paths(env.python))]
            + [(str(Path(package_root) / "flowsession"), f"{PACKAGE_INSIDE}/flowsession"),
               (str(slot / "flow"), f"{INSIDE}/flow")],
            rw_binds=[(str(slot / "work"), f"{INSIDE}/work"),
                      (str(slot / "state"), f"{INSIDE}/state")],
            env={**base_env, "HOME": f"{INSIDE}/work", "PYTHONPATH": PACKAGE_INSIDE},
            chdir=f"{INSIDE}/work",
            hidden=[str(Path(self.settings.db_url.removeprefix("sqlite:///"))),
                    str(self.settings.secret_key_file)],
        )
        return sandbox.wrap(argv, box, bwrap=self.bwrap), {}


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


_RUN_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}$")
_SLOT_ID = re.compile(r"^s[0-9a-f]{10}$")  # start_standby's slot ids


def _descends(pid: int, ancestors: set[int], parents: dict[int, int]) -> bool:
    """Is ``pid`` below one of ``ancestors`` (itself excluded)?"""
    seen = 0
    while (pid := parents.get(pid, 0)) > 1 and seen < 4096:
        if pid in ancestors:
            return True
        seen += 1
    return False


def _complete_records(run_fd: int) -> list[bytes]:
    """The complete lines of a run folder's results files (at most MAX_SALVAGE bytes)."""
    budget, out = MAX_SALVAGE, []
    for name in boundary.entries(run_fd):
        if budget <= 0 or not (name.startswith("results.") and name.endswith(".jsonl")):
            continue
        got = boundary.read_file(run_fd, name, limit=budget)
        if got is None:
            continue
        data = got[0]
        budget -= len(data)
        out += [line for line in data[:data.rfind(b"\n") + 1].split(b"\n")[:-1]
                if len(line) <= boundary.MAX_RECORD]
    return out

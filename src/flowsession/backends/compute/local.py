"""The local compute backend: sessions as processes on this machine.

A compute is a resource group (cgroup v2 or v1 where the host allows, otherwise rlimits) sized
by its VM size. A session is a supervisor process (``flowsession.worker.supervisor``) in the
flow's environment plus the warm workers it forks, run under bubblewrap where available: the
environment and the flow read-only, a private working directory, no view of other sessions'
files, the control plane's database or its secrets.

Each session has a *slot*: ``<runtime>/slots/<id>/{flow,work,state}``; the supervisor's socket
is ``state/s.sock``. Inside the sandbox the slot is ``/session``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import flowsession
from flowsession.backends.compute import procs, sandbox
from flowsession.backends.compute.base import (
    BackendState,
    BackendStatus,
    ComputeHandle,
    ComputeSpec,
    EnvHandle,
    SessionHandle,
    SessionSpec,
)
from flowsession.backends.compute.limits import Limits, LimitsError
from flowsession.config import Settings
from flowsession.errors import BuildFailed, Conflict, LineFailed, SessionFailed
from flowsession.worker import protocol

INSIDE = "/session"  # the slot, as the sandboxed session sees it
RUNS = "runs"  # the runs' folders, under the slot's state/
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

    async def start_standby(self, env: EnvHandle, *, idle_timeout_s: float) -> SessionHandle:
        """Spawn a supervisor in standby; returns at once (it imports the runtime meanwhile)."""
        slot_id = f"s{uuid.uuid4().hex[:10]}"
        slot = self.settings.runtime_dir / "slots" / slot_id
        for sub in ("flow", "work", "state"):
            (slot / sub).mkdir(parents=True, exist_ok=True)
        for path in env.read_only_paths:  # the images and environments dirs: bind sources
            Path(path).mkdir(parents=True, exist_ok=True)
        os.chmod(slot, 0o700)
        inside = INSIDE if self.bwrap else str(slot)
        argv = [env.python, "-m", "flowsession.worker.supervisor",
                "--socket", f"{inside}/state/s.sock", "--state-dir", f"{inside}/state",
                "--standby", "--idle-timeout", str(idle_timeout_s)]
        argv, environ = self._sandboxed(argv, env, slot)
        proc = subprocess.Popen(argv, env=environ, cwd=slot / "work", start_new_session=True,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=open(slot / "state" / "launch.log", "wb"))
        handle = SessionHandle(
            backend=self.name, session_id=slot_id, pid=proc.pid,
            pid_start=procs.start_time(proc.pid) or "", socket=str(slot / "state" / "s.sock"),
            slot=str(slot), sandboxed=self.bwrap is not None,
            sandbox_detail=sandbox.describe(self.bwrap is not None), limits_detail="",
            from_standby=False)
        return handle

    def orphans(self, known_slots: set[str]) -> list[SessionHandle]:
        """Supervisors no session or standby refers to: left by a control plane that died
        between starting one and recording it. Found by their command line (it names the
        slot), so even one whose handle was never written is found."""
        slots_dir = str(self.settings.runtime_dir / "slots") + "/"
        by_slot: dict[str, list[int]] = {}
        for pid, arg in procs.with_argument_under(slots_dir).items():
            slot = slots_dir + arg[len(slots_dir):].split("/", 1)[0]
            by_slot.setdefault(slot, []).append(pid)
        found = []
        for slot, pids in sorted(by_slot.items()):
            if slot in known_slots:
                continue
            top = min(pids)  # the launcher (bwrap, or the supervisor itself) started first
            found.append(SessionHandle(
                backend=self.name, session_id=Path(slot).name, pid=top,
                pid_start=procs.start_time(top) or "", socket=f"{slot}/state/s.sock",
                slot=slot, sandboxed=self.bwrap is not None, sandbox_detail="",
                limits_detail=""))
        return found

    async def start_session(self, compute: ComputeHandle, env: EnvHandle, spec: SessionSpec,
                            *, standby: SessionHandle | None = None) -> SessionHandle:
        if standby is None:
            standby = await self.start_standby(env, idle_timeout_s=spec.idle_timeout_s)
        try:
            self._join_limits(compute, standby)
            flow_inside = self._place_flow(standby, Path(spec.flow_dir))
            await self._wait_for(standby, {protocol.STANDBY}, STARTUP_TIMEOUT_S)
            answer = await asyncio.to_thread(protocol.request, standby.socket, {
                "op": "adopt", "flow": flow_inside, "site_dirs": list(env.site_dirs),
                "idle_timeout": spec.idle_timeout_s, "workers": spec.workers,
                "env": dict(spec.env_vars), "connections": dict(spec.connections)},
                STARTUP_TIMEOUT_S)
            if not answer.get("ok"):
                raise BuildFailed(f"the flow failed to load in its session: "
                                  f"{answer['error']['message']}",
                                  hint="fix the flow's code or requirements, then start again",
                                  log_tail=_tail(Path(standby.slot) / "state" / protocol.LOG_FILE),
                                  log_path=str(Path(standby.slot) / "state" / protocol.LOG_FILE))
        except BaseException:
            await self.stop_session(standby, reason="start failed")
            raise
        return replace(standby, session_id=spec.session_id,
                       limits_detail=Limits.describe(dict(compute.limits)))

    async def stop_session(self, handle: SessionHandle, *, reason: str = "") -> None:
        if procs.alive(handle.pid, handle.pid_start):
            try:
                await asyncio.to_thread(protocol.request, handle.socket,
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
        await asyncio.to_thread(shutil.rmtree, handle.slot, True)

    async def status(self, handle: SessionHandle) -> BackendStatus:
        state_dir = Path(handle.slot) / "state"
        if not procs.alive(handle.pid, handle.pid_start):
            ended = protocol.read_json(state_dir / protocol.EXIT_FILE)
            if ended:
                why = ended.get("reason", "ended")
                if why == "idle":
                    why = (f"idle for {ended.get('idle_seconds', 0):.0f} s: the session ended "
                           "itself")
                return BackendStatus(BackendState.EXITED, detail=why)
            failed = protocol.read_json(state_dir / protocol.STATUS_FILE) or {}
            detail = failed.get("error") or _tail(state_dir / protocol.LOG_FILE, 1)
            return BackendStatus(BackendState.LOST, detail=f"the supervisor (pid {handle.pid}) "
                                 f"is gone{': ' + detail if detail else ''}")
        try:
            ping = await asyncio.to_thread(protocol.request, handle.socket, {"op": "ping"}, 5.0)
        except (OSError, protocol.ProtocolError) as exc:
            return BackendStatus(BackendState.STARTING, detail=f"not answering: {exc}")
        phase = ping.get("phase")
        if phase == protocol.FAILED:
            return BackendStatus(BackendState.RUNNING, detail=ping.get("error") or "failed",
                                 failed=True)
        state = BackendState.RUNNING if phase == protocol.READY else BackendState.STARTING
        return BackendStatus(state, detail=phase or "", busy=int(ping.get("busy", 0)),
                             idle_seconds=float(ping.get("idle_seconds", 0.0)))

    async def test_line(self, handle: SessionHandle, inputs: Mapping[str, Any], *,
                        timeout: float, connections: Mapping[str, Any] | None = None,
                        init: Mapping[str, Any] | None = None) -> dict[str, Any]:
        msg: dict[str, Any] = {"op": "test", "inputs": dict(inputs), "timeout": timeout}
        if connections is not None:
            msg["connections"] = dict(connections)
        if init is not None:
            msg["init"] = dict(init)
        try:
            answer = await asyncio.to_thread(protocol.request, handle.socket, msg,
                                             timeout + 30)
        except (OSError, protocol.ProtocolError) as exc:
            raise SessionFailed(f"the session's supervisor is not answering: {exc}",
                                hint="reset the session: flowsession session reset FLOW") from None
        if answer.get("ok"):
            return answer["output"]
        kind, message = answer["error"]["type"], answer["error"]["message"]
        if kind == protocol.E_SESSION_FAILED:
            raise SessionFailed(message, hint="reset the session: flowsession session reset FLOW")
        if kind in (protocol.E_LINE_FAILED, protocol.E_TIMEOUT):
            raise LineFailed(message if kind == protocol.E_LINE_FAILED
                             else f"the line timed out: {message}",
                             hint="the session is still running; fix the inputs or the flow")
        raise Conflict(message)

    async def reload(self, handle: SessionHandle, snapshot: Path) -> None:
        """Load a changed flow: fresh workers on the new snapshot (lines running finish first)."""
        flow_inside = self._place_flow(handle, snapshot)
        answer = await asyncio.to_thread(protocol.request, handle.socket,
                                         {"op": "reload", "flow": flow_inside}, STARTUP_TIMEOUT_S)
        if not answer.get("ok"):
            raise SessionFailed(f"the changed flow failed to load: {answer['error']['message']}",
                                hint="fix the flow and test again, or reset the session")

    async def configure(self, handle: SessionHandle, *, idle_timeout_s: float) -> None:
        await asyncio.to_thread(protocol.request, handle.socket,
                                {"op": "configure", "idle_timeout": idle_timeout_s}, 10.0)

    # --- batch runs --------------------------------------------------------------------------

    def run_dir(self, handle: SessionHandle, run_id: str) -> Path:
        path = Path(handle.slot) / "state" / RUNS / run_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _inside(self, handle: SessionHandle, path: Path | str) -> str:
        """A path under the slot as the sandboxed session sees it."""
        if not handle.sandboxed:
            return str(path)
        return f"{INSIDE}/{Path(path).relative_to(handle.slot)}"

    async def _request(self, handle: SessionHandle, msg: dict[str, Any],
                       timeout: float) -> dict[str, Any]:
        try:
            answer = await asyncio.to_thread(protocol.request, handle.socket, msg, timeout)
        except (OSError, protocol.ProtocolError) as exc:
            raise SessionFailed(f"the session's supervisor is not answering: {exc}",
                                hint="reset the session: flowsession session reset FLOW") from None
        if not answer.get("ok"):
            kind, message = answer["error"]["type"], answer["error"]["message"]
            if kind in (protocol.E_SESSION_FAILED, protocol.E_STOPPED):
                raise SessionFailed(message, hint="reset the session: flowsession session reset FLOW")
            raise Conflict(message)
        return answer

    def _run_msg(self, handle: SessionHandle, run_id: str, work: Mapping[str, Any]) -> dict:
        msg = {**work, "id": run_id, "dir": self._inside(handle, self.run_dir(handle, run_id))}
        if work.get("flow"):
            msg["flow"] = self._inside(handle, work["flow"])
        return msg

    async def submit_run(self, handle: SessionHandle, run_id: str, work: Mapping[str, Any]
                         ) -> dict[str, Any]:
        msg = {"op": "run", **self._run_msg(handle, run_id, work)}
        return (await self._request(handle, msg, 60.0))["run"]

    async def run_status(self, handle: SessionHandle, run_id: str) -> dict[str, Any] | None:
        if not procs.alive(handle.pid, handle.pid_start):
            return None
        try:
            answer = await self._request(handle, {"op": "run_status", "id": run_id}, 10.0)
        except SessionFailed:
            return None
        return answer.get("run")

    async def cancel_run(self, handle: SessionHandle, run_id: str) -> None:
        if procs.alive(handle.pid, handle.pid_start):
            with contextlib.suppress(SessionFailed):
                await self._request(handle, {"op": "run_cancel", "id": run_id}, 10.0)

    async def aggregate_run(self, handle: SessionHandle, run_id: str,
                            work: Mapping[str, Any], records: str) -> dict[str, Any]:
        msg = {"op": "aggregate", **self._run_msg(handle, run_id, work), "file": records}
        return await self._request(handle, msg, AGGREGATE_TIMEOUT_S)

    def run_dirs(self, run_id: str) -> list[Path]:
        live = self.settings.runtime_dir.glob(f"slots/*/state/{RUNS}/{run_id}")
        salvaged = self.settings.salvage_dir.glob(f"*/{run_id}")
        return sorted(p for p in [*live, *salvaged] if p.is_dir())

    def _salvage_runs(self, handle: SessionHandle) -> None:
        """Keep the session's run folders (results not collected yet) before the slot goes."""
        runs = Path(handle.slot) / "state" / RUNS
        if not runs.is_dir() or not any(runs.iterdir()):
            return
        target = self.settings.salvage_dir / Path(handle.slot).name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(runs, target)
        except OSError:  # another filesystem
            shutil.copytree(runs, target, dirs_exist_ok=True)

    # --- helpers ---------------------------------------------------------------------------

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
        """Copy the snapshot into the slot (read-only inside the sandbox); its path inside."""
        target = Path(handle.slot) / "flow" / snapshot.name
        if not target.exists():
            tmp = target.with_name(f".{target.name}.tmp")
            shutil.copytree(snapshot, tmp, symlinks=False)
            os.rename(tmp, target)
        return f"{INSIDE}/flow/{snapshot.name}" if handle.sandboxed else str(target)

    async def _wait_for(self, handle: SessionHandle, phases: set[str], timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            if not procs.alive(handle.pid, handle.pid_start):
                log = Path(handle.slot) / "state"
                detail = _tail(log / protocol.LOG_FILE, 5) or _tail(log / "launch.log", 5)
                raise BuildFailed("the session's supervisor exited while starting",
                                  hint="see its log", log_tail=detail,
                                  log_path=str(log / protocol.LOG_FILE))
            try:
                ping = await asyncio.to_thread(protocol.request, handle.socket, {"op": "ping"}, 5)
                if ping.get("phase") in phases:
                    return ping
                if ping.get("phase") == protocol.FAILED:
                    raise BuildFailed(f"the session failed to start: {ping.get('error')}")
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


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])

"""The local compute backend: sessions as processes on this machine.

A compute is a resource group (cgroup v2 or v1 where the host allows, otherwise rlimits) sized
by its VM size. A session is a supervisor process (``flowsession.worker.supervisor``) in the
flow's environment plus the warm workers it forks, run under bubblewrap where available: the
environment and the flow read-only, a private working directory, no view of other sessions'
files, the control plane's database or its secrets.

Each session has a *slot* on this machine (``slots.Slot``): the handle's ``slot`` is its folder,
its ``ref`` the supervisor's ``pid``, ``pid_start`` and ``socket``. The control plane never
follows a path in a slot and never writes there: what it needs from a session comes over the
supervisor's socket as data (``client.SupervisorClient``, shared with the Ray backend), or,
once the session has ended, is read with ``boundary`` (no symlink followed, regular files only,
bounded) and kept in the control plane's own folders.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from flowsession.backends.compute import boundary, procs, sandbox
from flowsession.backends.compute.base import (
    BackendStatus,
    ComputeHandle,
    ComputeSpec,
    EnvHandle,
    SessionHandle,
    SessionSpec,
)
from flowsession.backends.compute.client import (
    STARTUP_TIMEOUT_S,
    SupervisorClient,
    Unreachable,
    over_socket,
)
from flowsession.backends.compute.limits import Limits, LimitsError
from flowsession.backends.compute.slots import (
    SLOT_ID,
    Launched,
    Slot,
)
from flowsession.config import Settings
from flowsession.errors import BuildFailed
from flowsession.worker import protocol


@dataclass(frozen=True)
class LocalRef:
    """What the local backend keeps in a handle's ``ref``."""

    pid: int
    pid_start: str
    socket: str

    @classmethod
    def of(cls, handle: SessionHandle) -> LocalRef:
        ref = handle.ref
        return cls(pid=int(ref.get("pid") or 0), pid_start=str(ref.get("pid_start") or ""),
                   socket=str(ref.get("socket") or ""))

    def launched(self) -> Launched:
        return Launched(self.pid, self.pid_start, self.socket)


class LocalBackend(SupervisorClient):
    name: ClassVar[str] = "local"
    builds_environments: ClassVar[bool] = False

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

    def _slot(self, handle: SessionHandle) -> Slot:
        return Slot.at(handle.slot)

    def _hidden(self) -> list[str]:
        return [str(Path(self.settings.db_url.removeprefix("sqlite:///"))),
                str(self.settings.secret_key_file)]

    async def start_standby(self, env: EnvHandle, *, idle_timeout_s: float,
                            compute: ComputeHandle | None = None) -> SessionHandle:
        """Spawn a supervisor in standby; returns at once (it imports the runtime meanwhile).
        It joins its compute's limits at adoption (``compute`` changes nothing here)."""
        slot = Slot.new(self.settings.runtime_dir)
        launched = slot.launch(env.python, env.read_only_paths, idle_timeout_s=idle_timeout_s,
                               bwrap=self.bwrap, hidden=self._hidden())
        return SessionHandle(
            backend=self.name, session_id=slot.id, slot=str(slot.path),
            sandboxed=self.bwrap is not None,
            sandbox_detail=sandbox.describe(self.bwrap is not None), limits_detail="",
            ref={"pid": launched.pid, "pid_start": launched.pid_start,
                 "socket": launched.socket})

    def alive(self, handle: SessionHandle) -> bool:
        """Is the session's top process still there (not a reused pid)?"""
        ref = LocalRef.of(handle)
        return procs.alive(ref.pid, ref.pid_start)

    def orphans(self, known: set[str]) -> list[SessionHandle]:
        """Supervisors no session or standby refers to (``known``: their slots): left
        by a control plane that died between starting one and recording it. Found by their
        command line (it names the slot), so even one whose handle was never written is
        found."""
        slots_dir = str(self.settings.runtime_dir / "slots") + "/"
        by_slot: dict[str, list[int]] = {}
        for pid, arg in procs.with_argument_under(slots_dir).items():
            name = arg[len(slots_dir):].split("/", 1)[0]
            if SLOT_ID.match(name):  # flow code can name its processes anything ("..")
                by_slot.setdefault(slots_dir + name, []).append(pid)
        # ... and run them inside a session we know: nothing below a known session is an orphan
        ours = {pid for slot, pids in by_slot.items() if slot in known for pid in pids}
        parent_of = procs.parents() if ours else {}
        found = []
        for slot, pids in sorted(by_slot.items()):
            pids = [p for p in pids if not procs.descends(p, ours, parent_of)]
            if slot in known or not pids:
                continue
            top = min(pids)  # the launcher (bwrap, or the supervisor itself) started first
            found.append(SessionHandle(
                backend=self.name, session_id=Path(slot).name, slot=slot,
                sandboxed=self.bwrap is not None, sandbox_detail="", limits_detail="",
                ref={"pid": top, "pid_start": procs.start_time(top) or "",
                     "socket": str(Slot.at(slot).socket)}))
        return found

    async def start_session(self, compute: ComputeHandle, env: EnvHandle, spec: SessionSpec,
                            *, standby: SessionHandle | None = None) -> SessionHandle:
        if standby is None:
            standby = await self.start_standby(env, idle_timeout_s=spec.idle_timeout_s)
        try:
            self._join_limits(compute, standby)
            flow_inside = await self._place_flow(standby, Path(spec.flow_dir))
            sites = await asyncio.to_thread(self._slot(standby).place_env, env.env_id,
                                            env.site_dirs, sandboxed=standby.sandboxed)
            await self._wait_for(standby, {protocol.Phase.STANDBY}, STARTUP_TIMEOUT_S)
            try:
                answer = await self._call(standby, {
                    "op": "adopt", "flow": flow_inside, "site_dirs": sites,
                    "idle_timeout": spec.idle_timeout_s, "workers": spec.workers,
                    "env": dict(spec.env_vars), "connections": dict(spec.connections)},
                    STARTUP_TIMEOUT_S)
            except Unreachable as exc:
                answer = {"ok": False, "error": {"message": f"no answer: {exc}"}}
            failed = self._adopt_failed(answer, self._slot(standby).log_lines(20))
            if failed is not None:
                raise failed
        except BaseException:
            await self.stop_session(standby, reason="start failed")
            raise
        return replace(standby, session_id=spec.session_id,
                       limits_detail=Limits.describe(dict(compute.limits)))

    async def stop_session(self, handle: SessionHandle, *, reason: str = "") -> None:
        slot, ref = self._slot(handle), LocalRef.of(handle)
        launched = ref.launched()
        if procs.alive(ref.pid, ref.pid_start):  # asked without a thread waiting on it
            with contextlib.suppress(Unreachable):
                await self._call(handle, {"op": "shutdown", "reason": reason or "stopped"}, 5.0)
            deadline = time.monotonic() + 5
            while procs.alive(ref.pid, ref.pid_start) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        slot.kill(launched)
        self._keep_salvage(handle, await asyncio.to_thread(slot.salvage))
        self._keep_log(handle, slot.log_tail(tail_bytes=1 << 20))
        await asyncio.to_thread(slot.remove)

    async def status(self, handle: SessionHandle) -> BackendStatus:
        slot = self._slot(handle)
        if not self.alive(handle):
            exit_info, failed = slot.ended()
            return self._ended(exit_info, failed, slot.log_lines(1))
        return await self._live(handle, slot.log_size())

    async def logs(self, handle: SessionHandle, *, tail_bytes: int = 256 * 1024) -> str:
        """The session's log (its supervisor's and workers' output): the last
        ``tail_bytes``, as text; once it has ended, what was kept of it."""
        data = self._slot(handle).log_tail(tail_bytes=tail_bytes)
        if data is None:
            return self._kept_log(handle, tail_bytes)
        return boundary.text(data, tail_bytes)

    # --- the backend's part of SupervisorClient ---------------------------------------------

    async def _call(self, handle: SessionHandle, msg: dict[str, Any],
                    timeout: float) -> dict[str, Any]:
        return await over_socket(LocalRef.of(handle).socket, msg, timeout)

    async def _place_flow(self, handle: SessionHandle, snapshot: Path) -> str:
        return await asyncio.to_thread(self._slot(handle).place_flow, snapshot,
                                       sandboxed=handle.sandboxed)

    # --- helpers ---------------------------------------------------------------------------

    def process_tree(self, handle: SessionHandle) -> list[int]:
        """The session's processes below its top pid (supervisor and workers), host pids."""
        return procs.tree(LocalRef.of(handle).pid)

    def _join_limits(self, compute: ComputeHandle, handle: SessionHandle) -> None:
        """Move the session's processes into the compute's limits; workers forked later
        inherit them."""
        ref = LocalRef.of(handle)
        moved: set[int] = set()
        # Again until a look finds no process not yet moved: a child forked while its parent
        # was being moved (a standby still starting) stays behind otherwise, without limits.
        for _ in range(100):
            new = [p for p in [ref.pid, *self.process_tree(handle)] if p not in moved]
            if not new:
                return
            for pid in new:
                try:
                    self.limits.add_process(dict(compute.limits), pid)
                except (LimitsError, ProcessLookupError):
                    if procs.alive(ref.pid, ref.pid_start):
                        raise
                moved.add(pid)
        raise LimitsError("the session's processes kept forking while joining its limits")

    async def _wait_for(self, handle: SessionHandle, phases: set[str], timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive(handle):
                raise BuildFailed("the session's supervisor exited while starting",
                                  hint="see its log: flowsession session logs",
                                  log_tail=self._slot(handle).log_lines(5))
            try:
                ping = await self._call(handle, {"op": "ping"}, 5)
                if ping.get("phase") in phases:
                    return ping
                if ping.get("phase") == protocol.Phase.FAILED:
                    raise BuildFailed(f"the session failed to start: "
                                      f"{boundary.reason(ping.get('error'))}")
            except Unreachable:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise BuildFailed(f"the session did not start within {timeout:.0f} s")
            await asyncio.sleep(0.01)

"""A compute backend and what a test makes on it: the contract suite's tools
(tests/contract), for any backend."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

from flowsession.backends.compute import registry
from flowsession.backends.compute.base import (
    ComputeHandle,
    ComputeSpec,
    EnvHandle,
    SessionHandle,
    SessionSpec,
    VmSize,
)
from flowsession.backends.compute import procs
from flowsession.computes.service import ComputeService
from flowsession.config import Settings
from flowsession.environments.service import EnvironmentService
from flowsession.runs.service import RunService
from flowsession.sessions.service import SessionService
from flowsession.store import Store, open_store

FLOWS = Path(__file__).resolve().parents[1] / "flows"
USER = "ada"
GB = 10**9


@dataclass
class Lab:
    """A backend and what a test made on it (stopped and released at the end)."""

    settings: Settings
    store: Store
    backend: object
    envs: EnvironmentService
    computes: list[ComputeHandle] = field(default_factory=list)
    handles: list[SessionHandle] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.backend.name

    async def compute(self, vcpu: float = 1, memory: int = 1 * GB) -> ComputeHandle:
        spec = ComputeSpec(id=f"cmp-{uuid.uuid4().hex[:10]}", kind="serverless", owner=USER,
                           size=VmSize("tiny", vcpu, memory))
        handle = await self.backend.provision(spec)
        self.computes.append(handle)
        return handle

    async def env(self, flow: Path) -> tuple[EnvHandle, Path]:
        """The flow's environment as a session needs it, and its snapshot (as the sessions
        service makes them: built here, or recorded here and built on the node)."""
        prepared = await self.envs.prepare(flow)
        if self.backend.builds_environments:
            env = self.envs.remember(prepared)
            recipe = self.envs.recipe(prepared)
        else:
            env = await self.envs.ensure(prepared)
            recipe = None
        image = self.envs.images.get(prepared.image.ref)
        site = sorted(Path(env.path).glob("lib/python*/site-packages"))
        return EnvHandle(env_id=env.id, python=str(Path(image.path) / "bin" / "python"),
                         image_ref=image.ref, site_dirs=tuple(str(p) for p in site),
                         read_only_paths=(str(self.settings.images_dir),),
                         recipe=recipe), prepared.snapshot.path

    async def start(self, flow: Path, *, idle: float = 600.0,
                    compute: ComputeHandle | None = None,
                    standby: SessionHandle | None = None) -> SessionHandle:
        compute = compute or await self.compute()
        env, snapshot = await self.env(flow)
        spec = SessionSpec(session_id=f"ses-{uuid.uuid4().hex[:10]}", flow_dir=str(snapshot),
                           idle_timeout_s=idle)
        handle = await self.backend.start_session(compute, env, spec, standby=standby)
        self.handles.append(handle)
        return handle

    async def standby(self, flow: Path, compute: ComputeHandle | None = None) -> SessionHandle:
        env, _snapshot = await self.env(flow)
        if env.recipe is not None:
            env = replace(env, recipe=self.envs.image_recipe(env.image_ref))
        handle = await self.backend.start_standby(env, idle_timeout_s=600, compute=compute)
        self.handles.append(handle)
        return handle

    def kill(self, handle: SessionHandle) -> None:
        kill_supervisor(handle)

    async def wait_run(self, handle: SessionHandle, run_id: str, *, states=("completed",),
                       timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            status = await self.backend.run_status(handle, run_id)
            if status is not None and status["state"] in states:
                return status
            assert time.monotonic() < deadline, f"run {run_id}: {status}"
            await asyncio.sleep(0.2)

    async def close(self) -> None:
        for handle in self.handles:
            with contextlib.suppress(Exception):
                await self.backend.stop_session(handle, reason="test teardown")
        for compute in self.computes:
            with contextlib.suppress(Exception):
                await self.backend.release(compute)


def services(settings: Settings) -> RunService:
    """The sessions and runs services over the settings' backend (found by name)."""
    store = open_store(settings.db_url)
    backend = registry.create(settings)
    sessions = SessionService(settings, store, envs=EnvironmentService(settings, store),
                              computes=ComputeService(settings, store, backend),
                              backend=backend)
    return RunService.open(settings, sessions=sessions)


async def stop_everything(service: SessionService) -> None:
    for session in service.records.list(owner=None):
        if session.state != "STOPPED":
            try:
                await service._stop(service.records.get(session.id), actor="test",
                                    reason="teardown")
            except Exception:
                if session.session_handle:
                    with contextlib.suppress(Exception):
                        await service.backend.stop_session(session.session_handle)
    await service.pool.drain()
    for compute in service.computes.list(user=None):
        if compute.compute_handle:
            with contextlib.suppress(Exception):
                await service.backend.release(compute.compute_handle)


def kill_supervisor(handle: SessionHandle) -> int:
    """SIGKILL the session's supervisor where it runs (the tests' nodes are this machine):
    the python running ``flowsession.worker.supervisor`` under the handle's top process (its
    workers are forked from it: the one whose parent is not one of them)."""
    found = {}
    for pid in [handle.pid, *procs.tree(handle.pid)]:
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if b"flowsession.worker.supervisor" in args and b"bwrap" not in args[0] \
                and args[0] != b"/bin/sh":
            found[pid] = ppid
    top = [pid for pid, ppid in found.items() if ppid not in found]
    assert top, f"no supervisor under {handle.pid}"
    os.kill(top[0], signal.SIGKILL)
    return top[0]


def all_cmdlines() -> str:
    """Every process's arguments on this machine, one process a line (to check that a secret
    was given to none of them)."""
    seen = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    seen.append(fh.read().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                pass
    return "\n".join(seen)

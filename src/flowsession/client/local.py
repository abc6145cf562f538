"""The in-process transport: the services called directly against the local store (the CLI's
control plane, ``FLOWSESSION_HOME``). Flows are folders; a name registered in the local flow
registry (``register_flow``) is accepted too."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flowsession.client.local_resources import LocalResources
from flowsession.config import Settings
from flowsession.errors import NotFound
from flowsession.runs.records import Run
from flowsession.runs.spec import RunSpec

Progress = Callable[[dict[str, Any]], None] | None


class LocalTransport(LocalResources):
    kind = "local"

    def __init__(self, settings: Settings | None = None, *, user: str | None = None):
        from flowsession.runs.service import RunService

        self.settings = settings or Settings.from_env()
        self.user = user or self.settings.user
        self._runs = RunService.open(self.settings)
        self._sessions = self._runs.sessions
        self._registry = None

    def close(self) -> None:
        pass

    # --- names and paths -------------------------------------------------------------------

    @property
    def registry(self):
        if self._registry is None:
            from flowsession.flows.registry import FlowRegistry

            self._registry = FlowRegistry(self.settings, self._sessions.store)
        return self._registry

    def flow_arg(self, flow: str | Path | None) -> str | None:
        """A folder (absolute), or the folder of a flow registered by that name."""
        if flow is None:
            return None
        path = Path(flow).expanduser()
        if not path.exists() and isinstance(flow, str) and "/" not in flow:
            try:
                return self.registry.get(flow).path
            except NotFound:
                pass
        return str(path.resolve())

    def data_arg(self, data: str | Path | None) -> str | None:
        return None if data is None else str(Path(data).expanduser().resolve())

    # --- runs ------------------------------------------------------------------------------

    def submit(self, spec: RunSpec, *, wait: bool,
               on_progress: Callable[[Run], None] | None) -> Run:
        created = asyncio.run(self._runs.create(spec, user=self.user))
        if not wait:
            return created
        return self.stream(created.name, on_progress=on_progress, timeout=None)

    def stream(self, name: str, *, on_progress: Callable[[Run], None] | None,
               timeout: float | None) -> Run:
        return asyncio.run(self._runs.wait(name, user=self.user, on_progress=on_progress,
                                           timeout=timeout))

    def get_run(self, name: str) -> Run:
        return asyncio.run(self._runs.advance(name, user=self.user))

    def list_runs(self, max_results: int | None) -> list[Run]:
        asyncio.run(self._runs.advance_all())
        return self._runs.list(user=self.user, limit=max_results)

    def get_details(self, name: str) -> list[dict[str, Any]]:
        return self._runs.details(name, user=self.user)

    def get_outputs(self, name: str) -> list[dict[str, Any]]:
        return self._runs.outputs(name, user=self.user)

    def get_metrics(self, name: str) -> dict[str, Any]:
        return self._runs.metrics(name, user=self.user)

    def run_path(self, name: str) -> str | None:
        self._runs.records.get(name, owner=self.user)
        return str(self._runs.files(name).root)

    def get_logs(self, name: str) -> list[dict[str, str]]:
        return [{"name": p.name, "text": p.read_text(errors="replace")}
                for p in self._runs.log_files(name, user=self.user)]

    def cancel(self, name: str) -> Run:
        return asyncio.run(self._runs.cancel(name, user=self.user))

    # --- sessions --------------------------------------------------------------------------

    def test(self, flow: str | Path, inputs: dict[str, Any], timeout: float,
             init: dict[str, Any] | None = None) -> dict[str, Any]:
        return asyncio.run(self._sessions.test(self.flow_arg(flow), inputs, user=self.user,
                                               timeout=timeout, init=init))

    def start_session(self, flow: str | Path, options: Mapping[str, Any], *,
                      on_progress: Progress = None):
        from flowsession.sessions.service import StartOptions

        options = dict(options)
        if "idle_time" in options:  # the server's spelling ("30m") is accepted here too
            from flowsession.config import parse_duration

            idle = options.pop("idle_time")
            if idle is not None:
                options["idle_timeout_s"] = parse_duration(idle, name="idle_time")
        return asyncio.run(self._sessions.start(self.flow_arg(flow), user=self.user,
                                                options=StartOptions(**options)))

    def get_session(self, flow: str | Path):
        return asyncio.run(self._sessions.show(self.flow_arg(flow), user=self.user))

    def list_sessions(self, all: bool) -> list:
        return asyncio.run(self._sessions.list(user=self.user, include_stopped=all))

    def session_events(self, flow: str | Path) -> list[dict[str, Any]]:
        return [dataclasses.asdict(e) for e in self._sessions.events(self.flow_arg(flow),
                                                                      user=self.user)]

    def session_packages(self, flow: str | Path) -> list[dict[str, Any]]:
        return [dataclasses.asdict(p) for p in self._sessions.packages(self.flow_arg(flow),
                                                                        user=self.user)]

    def stop_session(self, flow: str | Path):
        return asyncio.run(self._sessions.stop(self.flow_arg(flow), user=self.user))

    def install(self, flow: str | Path, *, on_progress: Progress = None):
        return asyncio.run(self._sessions.install(self.flow_arg(flow), user=self.user))

    def reset_session(self, flow: str | Path, *, on_progress: Progress = None):
        return asyncio.run(self._sessions.reset(self.flow_arg(flow), user=self.user))

    def update_session(self, flow: str | Path, changes: Mapping[str, Any]):
        from flowsession.config import parse_duration

        idle = changes.get("idle_time")
        return asyncio.run(self._sessions.update(
            self.flow_arg(flow), user=self.user, vm_size=changes.get("vm_size"),
            identity=changes.get("identity"), instance=changes.get("instance"),
            idle_timeout_s=parse_duration(idle, name="idle_time") if idle else None))

    # --- sessions by id ------------------------------------------------------------------

    def _by_id(self, session_id: str):
        return self._sessions.get(session_id, user=self.user)

    def get_session_by_id(self, session_id: str):
        return asyncio.run(self._sessions.refresh(self._by_id(session_id)))

    def session_events_by_id(self, session_id: str) -> list[dict[str, Any]]:
        return [dataclasses.asdict(e)
                for e in self._sessions.session_events(self._by_id(session_id))]

    def session_packages_by_id(self, session_id: str) -> list[dict[str, Any]]:
        return [dataclasses.asdict(p)
                for p in self._sessions.session_packages(self._by_id(session_id))]

    def session_logs(self, session_id: str, *, tail_bytes: int) -> str:
        return asyncio.run(self._sessions.session_logs(self._by_id(session_id),
                                                       tail_bytes=tail_bytes))

    def stop_session_by_id(self, session_id: str):
        return asyncio.run(self._sessions.stop_session(self._by_id(session_id),
                                                       actor=self.user))

    def reset_session_by_id(self, session_id: str, *, on_progress: Progress = None):
        return asyncio.run(self._sessions.reset_session(self._by_id(session_id),
                                                        actor=self.user))

    def install_by_id(self, session_id: str, *, on_progress: Progress = None):
        return asyncio.run(self._sessions.install_session(self._by_id(session_id),
                                                          actor=self.user))

    def update_session_by_id(self, session_id: str, changes: Mapping[str, Any]):
        from flowsession.config import parse_duration

        idle = changes.get("idle_time")
        return asyncio.run(self._sessions.update_session(
            self._by_id(session_id), actor=self.user, vm_size=changes.get("vm_size"),
            identity=changes.get("identity"), instance=changes.get("instance"),
            idle_timeout_s=parse_duration(idle, name="idle_time") if idle else None))

    # --- flows, computes, who am I ---------------------------------------------------------

    def get_flow(self, name: str) -> dict[str, Any]:
        return dataclasses.asdict(self.registry.get(name, owner=self.user))

    def register_flow(self, name: str, path: str | Path, *, on_server: bool) -> dict[str, Any]:
        folder = str(Path(path).expanduser().resolve())
        return dataclasses.asdict(self.registry.register(name, owner=self.user, path=folder))

    def read_flow_file(self, flow: str | Path, path: str) -> str:
        from flowsession.flows.paths import file_in

        target = file_in(Path(self.flow_arg(flow)), path, confined=False)
        try:
            return target.read_text()
        except FileNotFoundError:
            raise NotFound(f"flow {flow} has no file {path!r}",
                           details={"flow": str(flow), "file": path}) from None

    def write_flow_file(self, flow: str | Path, path: str, content: str) -> None:
        from flowsession.flows.paths import file_in

        target = file_in(Path(self.flow_arg(flow)), path, confined=False)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)

    def me(self) -> dict[str, Any]:
        return {"user": self.user, "roles": [], "scopes": ["*"], "server": None}

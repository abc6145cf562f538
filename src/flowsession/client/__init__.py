"""The Python SDK: ``flowsession.Client``, in prompt flow's words (``pf.run``, ``get_details``,
``get_metrics``, ``stream``) plus sessions.

Today the client runs the services in-process against the local store (the CLI's control
plane); the same methods will speak to a flowsession server by URL and token.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flowsession.config import Settings
from flowsession.runs.records import Run
from flowsession.runs.spec import RunSpec, spec_from_dict


class Client:
    """``Client()`` uses the local flowsession home (``FLOWSESSION_HOME``) as the CLI does."""

    def __init__(self, settings: Settings | None = None, *, user: str | None = None):
        from flowsession.runs.service import RunService

        self.settings = settings or Settings.from_env()
        self.user = user or self.settings.user
        self._runs = RunService.open(self.settings)
        self._sessions = self._runs.sessions

    # --- runs ------------------------------------------------------------------------------

    def run(self, flow: str | Path | None = None, data: str | Path | None = None, *,
            column_mapping: Mapping[str, Any] | None = None, run: str | Run | None = None,
            variant: str | None = None, resources: Mapping[str, Any] | None = None,
            identity: str | None = None,
            environment_variables: Mapping[str, str] | None = None,
            connections: Mapping[str, Mapping[str, str]] | None = None,
            name: str | None = None, display_name: str | None = None,
            description: str | None = None, tags: Mapping[str, str] | None = None,
            init: Mapping[str, Any] | None = None, workers: int | None = None,
            line_timeout: float | None = None, skip_malformed: bool = False,
            resume_from: str | Run | None = None, wait: bool = True,
            on_progress: Callable[[Run], None] | None = None, **extra: Any) -> Run:
        """Create a run (prompt flow's ``pf.run``) and, unless ``wait=False``, wait for it to
        end. Unknown keyword arguments are refused, naming them."""
        if extra:
            raise TypeError(f"run() got unexpected argument(s): {', '.join(sorted(extra))}")
        fields: dict[str, Any] = {
            "flow": _path(flow), "data": _path(data), "column_mapping": column_mapping,
            "run": _name(run), "variant": variant, "resources": resources,
            "identity": identity, "environment_variables": environment_variables,
            "connections": connections, "name": name, "display_name": display_name,
            "description": description, "tags": tags, "init": init, "workers": workers,
            "line_timeout": line_timeout, "skip_malformed": skip_malformed or None,
            "resume_from": _name(resume_from)}
        spec, _ = spec_from_dict({k: v for k, v in fields.items() if v is not None},
                                 source="Client.run")
        return self.submit(spec, wait=wait, on_progress=on_progress)

    def submit(self, spec: RunSpec, *, wait: bool = True,
               on_progress: Callable[[Run], None] | None = None) -> Run:
        created = asyncio.run(self._runs.create(spec, user=self.user))
        if not wait:
            return created
        return self.stream(created.name, on_progress=on_progress)

    def stream(self, run: str | Run, *, on_progress: Callable[[Run], None] | None = None,
               timeout: float | None = None) -> Run:
        """Wait for the run to end, calling ``on_progress(run)`` as lines complete."""
        return asyncio.run(self._runs.wait(_name(run), user=self.user,
                                           on_progress=on_progress, timeout=timeout))

    def get_run(self, run: str | Run) -> Run:
        return asyncio.run(self._runs.advance(_name(run), user=self.user))

    def list_runs(self, max_results: int | None = 50) -> list[Run]:
        asyncio.run(self._runs.advance_all())
        return self._runs.list(user=self.user, limit=max_results)

    def get_details(self, run: str | Run, *, all_results: bool = True,
                    max_results: int = 100) -> list[dict[str, Any]]:
        """Per line: ``line_number``, ``status``, ``inputs``, ``outputs``, ``error``."""
        rows = self._runs.details(_name(run), user=self.user)
        return rows if all_results else rows[:max_results]

    def get_outputs(self, run: str | Run) -> list[dict[str, Any]]:
        """The completed lines' outputs (``outputs.jsonl``), each with its ``line_number``."""
        return self._runs.outputs(_name(run), user=self.user)

    def get_metrics(self, run: str | Run) -> dict[str, Any]:
        return self._runs.metrics(_name(run), user=self.user)

    def cancel(self, run: str | Run) -> Run:
        return asyncio.run(self._runs.cancel(_name(run), user=self.user))

    # --- sessions --------------------------------------------------------------------------

    def test(self, flow: str | Path, inputs: Mapping[str, Any] | None = None,
             *, timeout: float = 600) -> dict[str, Any]:
        """One line on the flow's session (started if none runs): its outputs."""
        return asyncio.run(self._sessions.test(_path(flow), dict(inputs or {}), user=self.user,
                                               timeout=timeout))

    def start_session(self, flow: str | Path, **options: Any):
        from flowsession.sessions.service import StartOptions

        return asyncio.run(self._sessions.start(_path(flow), user=self.user,
                                                options=StartOptions(**options)))

    def get_session(self, flow: str | Path):
        return asyncio.run(self._sessions.show(_path(flow), user=self.user))

    def stop_session(self, flow: str | Path):
        return asyncio.run(self._sessions.stop(_path(flow), user=self.user))


def _path(p: str | Path | None) -> str | None:
    return None if p is None else str(Path(p).expanduser().resolve())


def _name(run: str | Run | None) -> str | None:
    return run.name if isinstance(run, Run) else run

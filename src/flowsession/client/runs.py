"""The ``Client``'s runs, in prompt flow's words (``pf.run``, ``stream``, ``get_details``,
``get_metrics``).

A local data file is read here and sent inline (``data_lines``), or by its path to this home's
local server (which reads it itself); a data path that is not a local file is taken as a file
of the flow's folder on the server."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from flowsession.client.http import POLL_S, SUBMIT_TIMEOUT_S, Http, q, run_from_dict
from flowsession.errors import FlowSessionError, InvalidInput
from flowsession.runs.model import ENDED, Run, RunStatus

if TYPE_CHECKING:
    from flowsession.runs.spec import RunSpec

OnRun = Callable[[Run], None] | None


class Runs:
    """Mixed into ``Client``; uses its ``_flow_name`` (``Flows``)."""

    _http: Http
    flows_by_path: bool

    def run(self, flow: str | Path | None = None, data: str | Path | None = None, *,
            column_mapping: Mapping[str, Any] | None = None, run: str | Run | None = None,
            variant: str | None = None, resources: Mapping[str, Any] | None = None,
            identity: str | None = None,
            environment_variables: Mapping[str, str] | None = None,
            connections: Mapping[str, Mapping[str, str]] | None = None,
            name: str | None = None, display_name: str | None = None,
            description: str | None = None, tags: Mapping[str, str] | None = None,
            init: Mapping[str, Any] | None = None, workers: int | None = None,
            line_timeout: float | None = None, max_concurrency: int | None = None,
            skip_malformed: bool = False,
            resume_from: str | Run | None = None, wait: bool = True,
            on_progress: OnRun = None, **extra: Any) -> Run:
        """Create a run (prompt flow's ``pf.run``) and, unless ``wait=False``, wait for it to
        end. Unknown keyword arguments are refused, naming them.

        ``flow``: a flow folder, or a flow's name on the server.
        ``data``: a local data file (.jsonl, .json, .csv, .tsv); a path that is not a local
        file names a file of the flow's folder on the server."""
        if extra:
            raise TypeError(f"run() got unexpected argument(s): {', '.join(sorted(extra))}")
        fields: dict[str, Any] = {
            "flow": _str(flow), "data": _str(data), "column_mapping": column_mapping,
            "run": _name(run), "variant": variant, "resources": resources,
            "identity": identity, "environment_variables": environment_variables,
            "connections": connections, "name": name, "display_name": display_name,
            "description": description, "tags": tags, "init": init, "workers": workers,
            "line_timeout": line_timeout, "max_concurrency": max_concurrency,
            "skip_malformed": skip_malformed or None,
            "resume_from": _name(resume_from)}
        from flowsession.runs.spec import spec_from_dict  # pydantic: only when submitting

        spec, _ = spec_from_dict({k: v for k, v in fields.items() if v is not None},
                                 source="Client.run")
        return self.submit(spec, wait=wait, on_progress=on_progress)

    def submit(self, spec: RunSpec, *, wait: bool = True, on_progress: OnRun = None) -> Run:
        answer = self._http.request("POST", "/api/runs", json=self._run_body(spec),
                                    timeout=SUBMIT_TIMEOUT_S)
        run = run_from_dict(answer["run"])
        if not wait:
            return run
        last = [run, None]

        def progress(event: dict[str, Any]) -> None:
            if event.get("event") != "progress":
                return
            now = (event.get("status"), event.get("total"), event.get("completed"),
                   event.get("failed"))
            if now == last[1]:
                return  # the server repeats unchanged progress
            last[1] = now
            last[0] = dataclasses.replace(last[0], status=RunStatus(now[0]), total=now[1] or 0,
                                          completed=now[2] or 0, failed=now[3] or 0)
            if on_progress is not None:
                on_progress(last[0])

        try:
            result = self._http.wait_operation(answer["operation"]["id"], on_event=progress)
        except FlowSessionError as exc:
            if exc.code != "interrupted":
                raise
            return self.stream(run.name, on_progress=on_progress)
        final = run_from_dict(result)
        if on_progress is not None:
            on_progress(final)
        return final

    def stream(self, run: str | Run, *, on_progress: OnRun = None,
               timeout: float | None = None) -> Run:
        """Wait for the run to end (or ``timeout`` seconds: the run as it is then), calling
        ``on_progress(run)`` as lines complete. Follows the run's events (``GET
        /api/runs/NAME/events``), polling when the stream breaks."""
        name = _name(run)
        deadline = None if timeout is None else time.monotonic() + timeout
        last: Run | None = None
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return self.get_run(name)
            try:
                read = 30.0 if remaining is None else max(0.1, min(30.0, remaining))
                with contextlib.closing(self._http.sse(f"/api/runs/{name}/events",
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

    def get_run(self, run: str | Run) -> Run:
        return run_from_dict(self._http.request("GET", f"/api/runs/{_name(run)}"))

    def list_runs(self, max_results: int | None = 50) -> list[Run]:
        limit = 10000 if max_results is None else max_results
        return [run_from_dict(r) for r in self._http.request("GET", "/api/runs",
                                                              params={"max_results": limit})]

    def get_details(self, run: str | Run, *, all_results: bool = True,
                    max_results: int = 100) -> list[dict[str, Any]]:
        """Per line: ``line_number``, ``status``, ``inputs``, ``outputs``, ``error``."""
        rows = self._http.request("GET", f"/api/runs/{_name(run)}/details")
        return rows if all_results else rows[:max_results]

    def get_outputs(self, run: str | Run) -> list[dict[str, Any]]:
        """The completed lines' outputs (``outputs.jsonl``), each with its ``line_number``."""
        return self._http.request("GET", f"/api/runs/{_name(run)}/outputs")

    def get_metrics(self, run: str | Run) -> dict[str, Any]:
        return self._http.request("GET", f"/api/runs/{_name(run)}/metrics")

    def run_path(self, run: str | Run) -> str | None:
        """Where the run's files are (outputs.jsonl, metrics.json, logs), on the server's
        machine (told to an Owner only)."""
        return self._http.request("GET", f"/api/runs/{_name(run)}").get("output_path")

    def get_logs(self, run: str | Run) -> list[dict[str, str]]:
        """The run's log, then its workers' logs: ``[{"name", "text"}]``."""
        return self._http.request("GET", f"/api/runs/{_name(run)}/logs")

    def cancel(self, run: str | Run) -> Run:
        return run_from_dict(self._http.request("POST", f"/api/runs/{_name(run)}/cancel"))

    # --- a run's request body --------------------------------------------------------------

    def _run_body(self, spec: RunSpec) -> dict[str, Any]:
        body = spec.model_dump(exclude_defaults=True, exclude={"runtime", "flow", "data"})
        flow = spec.flow
        if not flow and spec.resume_from:  # the API needs the flow: the resumed run's
            flow = self._flow_of_run(spec.resume_from)
        if not flow:
            raise InvalidInput("a run needs a flow", hint="give flow= (a registered flow's "
                               "name, or a flow folder)", details={"field": "flow"})
        body["flow"] = self._flow_name(flow)
        if spec.data is not None:
            local = Path(spec.data).expanduser()
            if local.exists() and self.flows_by_path:  # this machine's server reads it itself
                body["data"] = str(local.resolve())
            elif local.exists():
                from flowsession.runs.data import load_data

                found = load_data(local, skip_malformed=spec.skip_malformed)
                body["data_lines"] = found.rows
                if found.skipped:  # for the run's summary
                    body["data_skipped"] = found.skipped_lines()
                    body["data_skipped_count"] = len(found.skipped)
            else:  # a file of the flow's folder on the server
                body["data"] = spec.data
        return body

    def _flow_of_run(self, name: str) -> str:
        path = self._http.request("GET", f"/api/runs/{q(name)}")["flow"]
        for flow in self._http.request("GET", "/api/flows"):
            if flow["path"] == path:
                return flow["name"]
        raise InvalidInput(f"the flow of run {name} is not registered on the server",
                           hint="give flow= with the run", details={"run": name})


def _name(run: str | Run | None) -> str | None:
    return run.name if isinstance(run, Run) else run


def _str(value: str | Path | None) -> str | None:
    return None if value is None else str(value)

"""Runs: submitted with prompt flow's Run fields, followed by polling or server-sent events."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import Field

from flowsession.access.accounts import Principal
from flowsession.api.context import (
    Forbidden,
    Services,
    check_identity,
    owner_for,
    require,
    services,
)
from flowsession.api.routers.flows import flow_of
from flowsession.errors import FlowSessionError, InvalidInput, NotFound
from flowsession.flows.paths import check_no_control, check_path_text, inside
from flowsession.runs.records import ENDED, Run
from flowsession.runs.spec import RunSpec, spec_from_dict

router = APIRouter(tags=["runs"])
HEARTBEAT_S = 15.0
EVENTS_POLL_S = 0.2  # a run's events: how often it is advanced (faster near its end)


class RunIn(RunSpec):
    """prompt flow's Run fields, as in a run.yml; here ``flow`` names a registered flow, and
    the data is a file of its folder, a path on the server (all:manage), or ``data_lines``."""

    flow: str | None = Field(default=None, description="a registered flow's name (optional "
                             "with resume_from)")
    data: str | None = Field(default=None, description="a data file in the flow's folder "
                             "(relative), or an absolute path on the server (all:manage)")
    data_lines: list[dict[str, Any]] | None = Field(default=None, description="the data inline")
    data_skipped: list[str] = Field(default=[], max_length=50, description="with data_lines "
                                    "and skip_malformed: the malformed lines the client left "
                                    "out (their numbers), for the run's summary")
    data_skipped_count: int = Field(default=0, ge=0, description="how many it left out")


INLINE = "data_lines.jsonl"


def _is_inline(path: str) -> bool:
    """Is ``path`` where ``data_lines`` were kept while the run was prepared?"""
    p = Path(path)
    return p.name == INLINE and p.parent.name.startswith("run-data-") \
        and p.parent.parent.name == "run-data"


def _scratch(svc: Services) -> Path:
    path = svc.settings.home / "run-data"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _as_sent(exc: FlowSessionError, sent: dict[str, str]) -> FlowSessionError:
    """``exc`` naming the data as the client sent it (a file of the flow, or data_lines),
    not where the server keeps it."""
    for server_path, as_sent in sorted(sent.items(), key=lambda kv: -len(kv[0])):
        exc.message = exc.message.replace(server_path, as_sent)
        exc.details = {k: v.replace(server_path, INLINE if as_sent == "data_lines" else as_sent)
                       if isinstance(v, str) else v for k, v in exc.details.items()}
    return exc


def run_of(svc: Services, who: Principal, name: str) -> Run:
    run = svc.runs.records.find(name)
    if run is None:
        raise NotFound(f"run {name!r} does not exist", details={"run": name})
    owner_for(who, run.owner, f"run {name!r}")
    return run


def _run_dict(run: Run, svc: Services | None = None, *,
              runs: Services | None = None) -> dict:
    """``svc``: with where its files are (for managers); ``runs``: with its system metrics
    and rate-limit word (from its files)."""
    d = run.to_dict()
    if runs is not None:
        d.update(runs.runs.system(run))
    d["spec"] = {k: v for k, v in run.spec.items() if k != "variant_node"}
    data = d["spec"].get("data")
    if isinstance(data, str) and _is_inline(data):  # the server's scratch copy: as sent
        d["spec"]["data"] = "data_lines"
    if svc is not None:  # where its files are on the server's machine (for its managers)
        d["output_path"] = str(svc.runs.files(run.name).root)
    return d


@router.post("/runs", status_code=202)
async def create_run(body: RunIn, request: Request,
                     who: Principal = Depends(require("runs:write")),
                     svc: Services = Depends(services)) -> dict:
    """Submit a run; it goes on in the flow's session. Returns the run and an operation that
    ends with the run (stream it: GET /api/operations/{id}/events)."""
    for field in ("name", "run", "resume_from"):  # run names, looked up before they are checked
        if getattr(body, field) is not None:
            check_no_control(getattr(body, field), field=field, what="run name")
    flow_name = body.flow
    if flow_name is None:
        if not body.resume_from:
            raise InvalidInput("a run needs a flow", details={"field": "flow"})
        base = run_of(svc, who, body.resume_from)
        found = svc.extra["flows"].by_path(base.flow)
        if found is None or found.owner != base.owner:
            raise NotFound(f"the flow of run {base.name!r} is no longer registered",
                           details={"field": "flow"})
        flow_name = f"{found.owner}:{found.name}"
    flow, owner = flow_of(svc, who, flow_name, field="flow")
    if owner != who.user:
        raise Forbidden("runs are submitted by the flow's owner", details={"flow": flow_name})
    check_identity(svc, who, body.identity)
    if body.resources.get("compute"):
        svc.sessions.computes.get(str(body.resources["compute"]), user=owner)
    fields = body.model_dump(exclude={"data_lines", "flow", "data", "data_skipped",
                                      "data_skipped_count"}, exclude_defaults=True)
    fields["flow"] = flow.path
    if body.data_lines is not None and body.data is not None:
        raise InvalidInput("give data or data_lines, not both", details={"field": "data"})
    inline: Path | None = None
    sent: dict[str, str] = {}  # a server path -> what the client sent, for error messages
    if body.data_lines is not None:
        inline = Path(tempfile.mkdtemp(prefix="run-data-", dir=_scratch(svc))) / INLINE
        inline.write_text("".join(json.dumps(r) + "\n" for r in body.data_lines))
        fields["data"] = str(inline)
        sent[str(inline)] = "data_lines"
    elif body.data is not None:
        path = Path(check_path_text(body.data, field="data", what="data path"))
        if path.is_absolute():
            if not who.manages_all:
                raise Forbidden("a data path on the server needs all:manage",
                                hint="send data_lines, or a file of the flow's folder",
                                details={"scope": "all:manage"})
        else:
            folder = Path(flow.path)
            if ".." in path.parts or (flow.uploaded and not inside(folder.resolve(),
                                                                    folder / path)):
                raise InvalidInput("data must stay inside the flow's folder",
                                   details={"field": "data"})
            path = folder / path
            sent[str(path)] = body.data
        fields["data"] = str(path)
    try:
        spec, warnings = spec_from_dict(fields, source="the run")
        skipped = ([str(x)[:200] for x in body.data_skipped], max(
            body.data_skipped_count, len(body.data_skipped))) if body.data_skipped else None
        run = await svc.runs.create(spec, user=owner, submit=False,  # the session: in the op
                                    skipped=skipped if body.data_lines is not None else None)
    except FlowSessionError as exc:
        raise _as_sent(exc, sent) from None
    finally:
        if inline is not None:  # the run keeps its own copy of the inputs
            shutil.rmtree(inline.parent, ignore_errors=True)

    async def work(emit) -> dict:
        last: tuple | None = None

        def progress(r: Run) -> None:
            nonlocal last
            now = (r.status, r.total, r.completed, r.failed)
            if now != last:  # only changes: a long line does not flood the stream
                last = now
                emit({"event": "progress", "status": r.status, "total": r.total,
                      "completed": r.completed, "failed": r.failed})

        ended = await svc.runs.wait(run.name, user=owner, on_progress=progress)
        return _run_dict(ended, runs=svc)

    op = request.app.state.operations.start("run", run.name, who.user, work)
    return {"run": _run_dict(run), "operation": op, "warnings": warnings}


@router.get("/runs")
def list_runs(max_results: int = Query(50, ge=1, le=10000),
              offset: int = Query(0, ge=0, le=2**31 - 1, description="skip this many (paging)"),
              who: Principal = Depends(require("runs:read")),
              svc: Services = Depends(services)) -> list[dict]:
    owner = None if who.manages_all else who.user
    return [_run_dict(r) for r in svc.runs.records.list(owner=owner, limit=max_results,
                                                         offset=offset)]


@router.get("/runs/{name}")
async def get_run(name: str, who: Principal = Depends(require("runs:read")),
                  svc: Services = Depends(services)) -> dict:
    run = run_of(svc, who, name)
    if run.status not in ENDED:
        run = await svc.runs.advance(name)
    return _run_dict(run, svc if who.manages_all else None,  # server paths: its managers'
                     runs=svc)


@router.get("/runs/{name}/details")
def details(name: str, who: Principal = Depends(require("runs:read")),
            svc: Services = Depends(services),
            offset: int = Query(0, ge=0, le=2**31 - 1, description="paging: skip this many"),
            max_results: int | None = Query(None, ge=1, le=100000),
            status: str | None = Query(None, pattern="^(Completed|Failed|NotStarted)$",
                                       description="only the lines with this status")
            ) -> list[dict]:
    run = run_of(svc, who, name)
    rows = svc.runs.details(name, user=run.owner)
    if status is not None:
        rows = [r for r in rows if r["status"] == status]
    return rows[offset: offset + max_results if max_results else None]


@router.get("/runs/{name}/outputs")
def outputs(name: str, who: Principal = Depends(require("runs:read")),
            svc: Services = Depends(services)) -> list[dict]:
    run = run_of(svc, who, name)
    return svc.runs.outputs(name, user=run.owner)


@router.get("/runs/{name}/metrics")
def metrics(name: str, who: Principal = Depends(require("runs:read")),
            svc: Services = Depends(services)) -> dict:
    run = run_of(svc, who, name)
    return svc.runs.metrics(name, user=run.owner)


@router.get("/runs/{name}/logs")
def logs(name: str, who: Principal = Depends(require("runs:read")),
         svc: Services = Depends(services)) -> list[dict]:
    """The run's own log, then each worker's: ``[{"name", "text"}]``."""
    run = run_of(svc, who, name)
    return [{"name": path.name, "text": path.read_text(errors="replace")}
            for path in svc.runs.log_files(name, user=run.owner)]


@router.post("/runs/{name}/cancel")
async def cancel(name: str, who: Principal = Depends(require("runs:write")),
                 svc: Services = Depends(services)) -> dict:
    run = run_of(svc, who, name)
    return _run_dict(await svc.runs.cancel(name, user=run.owner))


@router.get("/runs/{name}/events")
async def run_events(name: str, who: Principal = Depends(require("runs:read")),
                     svc: Services = Depends(services)) -> StreamingResponse:
    """Server-sent events: the run's progress until it ends."""
    run_of(svc, who, name)

    async def gen():
        import asyncio

        last, said = None, time.monotonic()
        while True:
            run = await svc.runs.advance(name)
            now = (run.status, run.completed, run.failed)
            if now != last:
                last, said = now, time.monotonic()
                yield f"data: {json.dumps(_run_dict(run, runs=svc), default=str)}\n\n"
            elif time.monotonic() - said > HEARTBEAT_S:  # keeps proxies and clients patient
                said = time.monotonic()
                yield ": heartbeat\n\n"
            if run.status in ENDED:
                yield "event: end\ndata: {}\n\n"
                return
            await asyncio.sleep(run.look_again_s(EVENTS_POLL_S))

    return StreamingResponse(gen(), media_type="text/event-stream")

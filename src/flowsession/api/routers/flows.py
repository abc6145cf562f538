"""Flows on the server, their files (Save only) and their session (one flow, one session)."""

from __future__ import annotations

import dataclasses
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from flowsession.access.accounts import Principal
from flowsession.api.context import (
    Forbidden,
    Services,
    check_identity,
    require,
    services,
)
from flowsession.api.routers import sessions
from flowsession.config import parse_duration
from flowsession.errors import NotFound
from flowsession.flows.paths import check_no_control
from flowsession.flows.registry import FlowRegistry, RegisteredFlow
from flowsession.sessions.options import StartOptions, check_options

router = APIRouter(tags=["flows and sessions"])


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FlowIn(Strict):
    name: str = Field(min_length=1, max_length=200)
    path: str | None = Field(default=None, description="a folder on the server's machine")
    files: dict[str, str] | None = Field(default=None, description="relative path -> text")


class FileIn(Strict):
    content: str


class StartIn(Strict):
    compute_type: str | None = Field(default=None, pattern="^(serverless|instance)$")
    vm_size: str | None = None
    instance: str | None = None
    idle_time: str | None = Field(default=None, description="e.g. 30m, 2h")
    identity: str | None = None
    image: str | None = None


class TestIn(Strict):
    inputs: dict[str, Any] = Field(default_factory=dict)
    timeout: float = Field(default=600, gt=0, le=86400)
    init: dict[str, Any] = Field(default_factory=dict, description="a flex flow class's "
                                 "__init__ arguments")
    trace: bool = Field(default=False, description="also each node's inputs, output, "
                        "duration and status (the answer's 'trace')")


def registry(svc: Services) -> FlowRegistry:
    return svc.extra["flows"]


def flow_of(svc: Services, who: Principal, name: str, *, field: str = "name"
            ) -> tuple[RegisteredFlow, str]:
    """The flow and the user to act as (its owner). Names are per owner: ``name`` is yours;
    those who manage everything may also name another's flow (``owner:name``, or just the name
    when only one user has it). Anyone else's flow is NotFound, as if it did not exist. A name
    with a NUL byte or another control character is a 422 naming ``field``."""
    check_no_control(name, field=field, what="flow name")
    owner, sep, short = name.rpartition(":")
    if sep and owner != who.user and not who.manages_all:
        raise NotFound(f"flow {name!r} does not exist", details={"flow": name})
    if sep:
        return registry(svc).get(short, owner=owner), owner
    try:
        return registry(svc).get(name, owner=who.user), who.user
    except NotFound:
        if not who.manages_all:
            raise
    found = registry(svc).named(name)
    if len(found) != 1:
        raise NotFound(f"flow {name!r} does not exist" + (
            " as yours; several users have one by that name: write OWNER:NAME" if found
            else ""), details={"flow": name})
    return found[0], found[0].owner


def _flow_dict(flow: RegisteredFlow) -> dict:
    return dataclasses.asdict(flow)


@router.get("/flows")
def list_flows(who: Principal = Depends(require("flows:read")),
               svc: Services = Depends(services)) -> list[dict]:
    owner = None if who.manages_all else who.user
    return [_flow_dict(f) for f in registry(svc).list(owner=owner)]


@router.post("/flows", status_code=201)
def register_flow(body: FlowIn, who: Principal = Depends(require("flows:write")),
                  svc: Services = Depends(services)) -> dict:
    if body.path is not None and not who.manages_all:
        raise Forbidden("registering a folder of the server's machine needs all:manage",
                        hint="upload the flow's files instead", details={"scope": "all:manage"})
    return _flow_dict(registry(svc).register(body.name, owner=who.user, path=body.path,
                                             files=body.files))


@router.get("/flows/{name}")
def get_flow(name: str, who: Principal = Depends(require("flows:read")),
             svc: Services = Depends(services)) -> dict:
    flow, _ = flow_of(svc, who, name)
    return {**_flow_dict(flow), "files": registry(svc).files(flow)}


@router.delete("/flows/{name}")
async def delete_flow(name: str, who: Principal = Depends(require("flows:write")),
                      svc: Services = Depends(services)) -> dict:
    flow, owner = flow_of(svc, who, name)
    try:  # by the stored key: a flow whose folder is gone is still unregistered
        session = svc.sessions.bound(flow.path, user=owner)
    except NotFound:
        pass
    else:
        await svc.sessions.stop_session(session, actor=owner, reason="flow unregistered")
    registry(svc).unregister(flow)
    return {"name": name, "deleted": True}


@router.get("/flows/{name}/files/{path:path}")
def read_file(name: str, path: str, who: Principal = Depends(require("flows:read")),
              svc: Services = Depends(services)) -> dict:
    flow, _ = flow_of(svc, who, name)
    return {"path": path, "content": registry(svc).read(flow, path)}


@router.put("/flows/{name}/files/{path:path}")
def write_file(name: str, path: str, body: FileIn,
               who: Principal = Depends(require("flows:write")),
               svc: Services = Depends(services)) -> dict:
    """Save only: a changed requirements.txt takes effect with POST .../session/install."""
    flow, _ = flow_of(svc, who, name)
    registry(svc).write(flow, path, body.content)
    return {"path": path, "saved": True}


# --- the flow's session (the operations are sessions.py's, shared with /api/sessions/{id}) ---

@router.get("/flows/{name}/session")
async def get_session(name: str, who: Principal = Depends(require("sessions:read")),
                      svc: Services = Depends(services)) -> dict:
    flow, owner = flow_of(svc, who, name)
    return await sessions.show(svc, svc.sessions.of_flow(flow.path, user=owner))


@router.post("/flows/{name}/session", status_code=202)
async def start_session(name: str, request: Request, body: StartIn | None = None,
                        who: Principal = Depends(require("sessions:write")),
                        svc: Services = Depends(services)) -> dict:
    """Start the flow's session (default settings, or the advanced ones given): returns an
    operation to poll (GET /api/operations/{id}) or stream (.../events)."""
    body = body or StartIn()
    flow, owner = flow_of(svc, who, name)
    options = StartOptions(
        compute_type=body.compute_type, vm_size=body.vm_size, instance=body.instance,
        idle_timeout_s=parse_duration(body.idle_time, name="idle_time") if body.idle_time
        else None, identity=body.identity, image=body.image)
    check_options(options, svc.sessions.computes)  # conflicting options: 422 now, naming them
    check_identity(svc, who, body.identity)
    if body.instance:
        svc.sessions.computes.get(body.instance, user=owner)  # another's instance: 404 now

    async def work(emit) -> dict:
        emit({"event": "progress", "message": "starting the session"})
        session = await sessions.watching(
            svc, lambda: svc.sessions.records.bound_to(flow.path), emit,
            svc.sessions.start(flow.path, user=owner, options=options))
        sessions.fill_pool(request, svc)
        return session.to_dict()

    return request.app.state.operations.start("session.start", name, who.user, work)


@router.post("/flows/{name}/session/install", status_code=202)
async def install(name: str, request: Request,
                  who: Principal = Depends(require("sessions:write")),
                  svc: Services = Depends(services)) -> dict:
    """Save and install: the flow's requirements into a new environment, switched to only
    when it works."""
    flow, owner = flow_of(svc, who, name)
    session = svc.sessions.of_flow(flow.path, user=owner)  # no session: 404 now
    return await sessions.install(request, svc, who, session, owner, name)


@router.post("/flows/{name}/session/reset", status_code=202)
async def reset(name: str, request: Request, who: Principal = Depends(require("sessions:write")),
                svc: Services = Depends(services)) -> dict:
    flow, owner = flow_of(svc, who, name)
    session = svc.sessions.of_flow(flow.path, user=owner)
    return await sessions.reset(request, svc, who, session, owner, name)


@router.post("/flows/{name}/session/stop")
async def stop(name: str, who: Principal = Depends(require("sessions:write")),
               svc: Services = Depends(services)) -> dict:
    flow, owner = flow_of(svc, who, name)
    return await sessions.stop(svc, who, svc.sessions.of_flow(flow.path, user=owner), owner)


@router.patch("/flows/{name}/session")
async def update(name: str, body: sessions.UpdateIn,
                 who: Principal = Depends(require("sessions:write")),
                 svc: Services = Depends(services)) -> dict:
    flow, owner = flow_of(svc, who, name)
    session = svc.sessions.of_flow(flow.path, user=owner)
    return await sessions.update(svc, who, session, owner, body)


@router.get("/flows/{name}/session/events")
def events(name: str, who: Principal = Depends(require("sessions:read")),
           svc: Services = Depends(services)) -> list[dict]:
    """The state changes of every session the flow has had."""
    flow, owner = flow_of(svc, who, name)
    return [dataclasses.asdict(e) for e in svc.sessions.events(flow.path, user=owner)]


@router.get("/flows/{name}/session/packages")
def packages(name: str, who: Principal = Depends(require("sessions:read")),
             svc: Services = Depends(services)) -> list[dict]:
    flow, owner = flow_of(svc, who, name)
    return sessions.packages(svc, svc.sessions.of_flow(flow.path, user=owner))


@router.post("/flows/{name}/test")
async def test(name: str, body: TestIn, who: Principal = Depends(require("sessions:write")),
               svc: Services = Depends(services)) -> dict:
    """One line on the flow's session (started with default settings if none runs)."""
    flow, owner = flow_of(svc, who, name)
    if body.trace:
        return await svc.sessions.test(flow.path, body.inputs, user=owner, timeout=body.timeout,
                                       init=body.init, with_trace=True)
    return {"outputs": await svc.sessions.test(flow.path, body.inputs, user=owner,
                                               timeout=body.timeout, init=body.init)}

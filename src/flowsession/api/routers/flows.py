"""Flows on the server, their files (Save only) and their session (one flow, one session)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
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
from flowsession.config import parse_duration
from flowsession.errors import Conflict, NotFound
from flowsession.flows.paths import check_no_control
from flowsession.flows.registry import FlowRegistry, RegisteredFlow
from flowsession.sessions.records import ACTIVE_STATES
from flowsession.sessions.service import StartOptions

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


class UpdateIn(Strict):
    idle_time: str | None = None
    vm_size: str | None = None
    instance: str | None = None
    identity: str | None = None


class TestIn(Strict):
    inputs: dict[str, Any] = Field(default_factory=dict)
    timeout: float = Field(default=600, gt=0, le=86400)
    init: dict[str, Any] = Field(default_factory=dict, description="a flex flow class's "
                                 "__init__ arguments")


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
    try:
        await svc.sessions.stop(flow.path, user=owner, reason="flow unregistered")
    except NotFound:
        pass
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


# --- the flow's session --------------------------------------------------------------------

@router.get("/sessions")
async def list_sessions(all: bool = False, who: Principal = Depends(require("sessions:read")),
                        svc: Services = Depends(services)) -> list[dict]:
    """The server's sweep keeps these current (no sweep per request)."""
    owner = None if who.manages_all else who.user
    states = None if all else ACTIVE_STATES
    return [s.to_dict() for s in svc.sessions.records.list(owner=owner, states=states)]


@router.get("/flows/{name}/session")
async def get_session(name: str, who: Principal = Depends(require("sessions:read")),
                      svc: Services = Depends(services)) -> dict:
    flow, owner = flow_of(svc, who, name)
    return (await svc.sessions.show(flow.path, user=owner)).to_dict()


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
    svc.sessions.check_options(options)  # conflicting options: 422 now, naming them
    check_identity(svc, who, body.identity)
    if body.instance:
        svc.sessions.computes.get(body.instance, user=owner)  # another's instance: 404 now

    async def work(emit) -> dict:
        emit({"event": "progress", "message": "starting the session"})
        session = await _watching(svc, flow.path, emit, svc.sessions.start(
            flow.path, user=owner, options=options))
        _fill_pool(request, svc)
        return session.to_dict()

    return request.app.state.operations.start("session.start", name, who.user, work)


@router.post("/flows/{name}/session/install", status_code=202)
async def install(name: str, request: Request,
                  who: Principal = Depends(require("sessions:write")),
                  svc: Services = Depends(services)) -> dict:
    """Save and install: the flow's requirements into a new environment, switched to only
    when it works."""
    flow, owner = flow_of(svc, who, name)
    session = await svc.sessions.show(flow.path, user=owner)  # no session: 404 now
    if session.state != "RUNNING":  # the wrong state: 409 now, not in the operation
        raise Conflict(f"session {session.id} is {session.state}: Save and install needs a "
                       "RUNNING session", hint="reset it, or start it again",
                       details={"state": session.state})

    async def work(emit) -> dict:
        emit({"event": "progress", "message": "installing the flow's requirements"})
        session = await svc.sessions.install(flow.path, user=owner)
        _fill_pool(request, svc)
        return session.to_dict()

    return request.app.state.operations.start("session.install", name, who.user, work)


@router.post("/flows/{name}/session/reset", status_code=202)
async def reset(name: str, request: Request, who: Principal = Depends(require("sessions:write")),
                svc: Services = Depends(services)) -> dict:
    flow, owner = flow_of(svc, who, name)
    await svc.sessions.show(flow.path, user=owner)

    async def work(emit) -> dict:
        session = await _watching(svc, flow.path, emit, svc.sessions.reset(
            flow.path, user=owner, reason=f"reset by {who.user}"))
        _fill_pool(request, svc)
        return session.to_dict()

    return request.app.state.operations.start("session.reset", name, who.user, work)


async def _watching(svc: Services, flow: str, emit, coro):
    """Await ``coro`` (a start or a reset), emitting each state the flow's session goes
    through (building the environment, starting the supervisor) as progress."""
    async def watch() -> None:
        last = None
        while True:
            session = svc.sessions.records.bound_to(flow)
            if session is not None and (session.state, session.reason) != last:
                last = (session.state, session.reason)
                emit({"event": "progress", "state": session.state,
                      "message": session.reason or session.state.lower()})
            await asyncio.sleep(0.2)

    watcher = asyncio.create_task(watch())
    try:
        return await coro
    finally:
        watcher.cancel()


def _fill_pool(request: Request, svc: Services) -> None:
    """Start standby supervisors in the background after a start, so the next start adopts
    one (one fill at a time)."""
    state = request.app.state
    if getattr(state, "pool_fill", None) is not None and not state.pool_fill.done():
        return

    async def fill() -> None:
        try:
            await svc.sessions.pool.fill()
        except Exception:  # noqa: BLE001 - a standby is an optimisation: log it, go on
            logging.getLogger("flowsession.server").exception("filling the standby pool")

    state.pool_fill = asyncio.get_running_loop().create_task(fill())


@router.post("/flows/{name}/session/stop")
async def stop(name: str, who: Principal = Depends(require("sessions:write")),
               svc: Services = Depends(services)) -> dict:
    flow, owner = flow_of(svc, who, name)
    return (await svc.sessions.stop(flow.path, user=owner, reason=f"stopped by {who.user}")
            ).to_dict()


@router.patch("/flows/{name}/session")
async def update(name: str, body: UpdateIn, who: Principal = Depends(require("sessions:write")),
                 svc: Services = Depends(services)) -> dict:
    flow, owner = flow_of(svc, who, name)
    check_identity(svc, who, body.identity)
    session = await svc.sessions.update(
        flow.path, user=owner, vm_size=body.vm_size, instance=body.instance,
        identity=body.identity,
        idle_timeout_s=parse_duration(body.idle_time, name="idle_time") if body.idle_time
        else None)
    return session.to_dict()


@router.get("/flows/{name}/session/events")
def events(name: str, who: Principal = Depends(require("sessions:read")),
           svc: Services = Depends(services)) -> list[dict]:
    flow, owner = flow_of(svc, who, name)
    return [dataclasses.asdict(e) for e in svc.sessions.events(flow.path, user=owner)]


@router.get("/flows/{name}/session/packages")
def packages(name: str, who: Principal = Depends(require("sessions:read")),
             svc: Services = Depends(services)) -> list[dict]:
    flow, owner = flow_of(svc, who, name)
    return [dataclasses.asdict(p) for p in svc.sessions.packages(flow.path, user=owner)]


@router.post("/flows/{name}/test")
async def test(name: str, body: TestIn, who: Principal = Depends(require("sessions:write")),
               svc: Services = Depends(services)) -> dict:
    """One line on the flow's session (started with default settings if none runs)."""
    flow, owner = flow_of(svc, who, name)
    return {"outputs": await svc.sessions.test(flow.path, body.inputs, user=owner,
                                               timeout=body.timeout, init=body.init)}

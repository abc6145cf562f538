"""Sessions by id (``/api/sessions/{id}/...``), and the session operations that the flow routes
(``/api/flows/{name}/session/...``, in ``flows.py``) share with them: each operation is written
once, on a session found either way. A session found by id needs nothing but its record, so one
whose flow folder was deleted or moved still shows, stops, and tells its events and its log."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict

from flowsession.access.accounts import Principal
from flowsession.api.context import Services, check_identity, require, services
from flowsession.config import parse_duration
from flowsession.sessions.records import ACTIVE_STATES, Session
from flowsession.sessions.service import LOG_TAIL_BYTES

router = APIRouter(tags=["flows and sessions"])
MAX_LOG_BYTES = 1024 * 1024


class UpdateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    idle_time: str | None = None
    vm_size: str | None = None
    instance: str | None = None
    identity: str | None = None


def session_of(svc: Services, who: Principal, session_id: str) -> tuple[Session, str]:
    """Session ``session_id`` and the user to act as (its owner): yours, or anyone's if you
    manage everything. Another user's is NotFound, exactly like one that does not exist."""
    session = svc.sessions.get(session_id, user=None if who.manages_all else who.user)
    return session, session.owner


# --- the operations, whichever way the session was found -----------------------------------

async def show(svc: Services, session: Session) -> dict:
    return (await svc.sessions.refresh(session)).to_dict()


async def install(request: Request, svc: Services, who: Principal, session: Session,
                  owner: str, resource: str) -> dict:
    """Save and install, as an operation; the wrong state or a missing flow folder is a 409
    now, not in the operation."""
    session = await svc.sessions.refresh(session)
    svc.sessions.check_install(session)

    async def work(emit) -> dict:
        emit({"event": "progress", "message": "installing the flow's requirements"})
        done = await svc.sessions.install_session(session, actor=owner)
        fill_pool(request, svc)
        return done.to_dict()

    return request.app.state.operations.start("session.install", resource, who.user, work)


async def reset(request: Request, svc: Services, who: Principal, session: Session,
                owner: str, resource: str) -> dict:
    """Reset, as an operation; a missing flow folder is a 409 now, and nothing changes."""
    session = await svc.sessions.refresh(session)
    svc.sessions.session_flow(session, needed_by="a reset")

    async def work(emit) -> dict:
        done = await watching(svc, lambda: svc.sessions.records.get(session.id), emit,
                              svc.sessions.reset_session(session, actor=owner,
                                                         reason=f"reset by {who.user}"))
        fill_pool(request, svc)
        return done.to_dict()

    return request.app.state.operations.start("session.reset", resource, who.user, work)


async def stop(svc: Services, who: Principal, session: Session, owner: str) -> dict:
    return (await svc.sessions.stop_session(session, actor=owner,
                                            reason=f"stopped by {who.user}")).to_dict()


async def update(svc: Services, who: Principal, session: Session, owner: str,
                 body: UpdateIn) -> dict:
    check_identity(svc, who, body.identity)
    idle = parse_duration(body.idle_time, name="idle_time") if body.idle_time else None
    return (await svc.sessions.update_session(
        session, actor=owner, vm_size=body.vm_size, instance=body.instance,
        identity=body.identity, idle_timeout_s=idle)).to_dict()


def packages(svc: Services, session: Session) -> list[dict]:
    return [dataclasses.asdict(p) for p in svc.sessions.session_packages(session)]


async def watching(svc: Services, current: Callable[[], Session | None], emit, coro):
    """Await ``coro`` (a start or a reset), emitting each state the session (``current()``)
    goes through (building the environment, starting the supervisor) as progress."""
    async def watch() -> None:
        last = None
        while True:
            session = current()
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


def fill_pool(request: Request, svc: Services) -> None:
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


# --- the routes ------------------------------------------------------------------------------

@router.get("/sessions")
async def list_sessions(all: bool = False, who: Principal = Depends(require("sessions:read")),
                        svc: Services = Depends(services)) -> list[dict]:
    """The server's sweep keeps these current (no sweep per request)."""
    owner = None if who.manages_all else who.user
    states = None if all else ACTIVE_STATES
    return [s.to_dict() for s in svc.sessions.records.list(owner=owner, states=states)]


@router.get("/sessions/{session_id}")
async def get_session(session_id: str, who: Principal = Depends(require("sessions:read")),
                      svc: Services = Depends(services)) -> dict:
    """The session, whatever became of its flow's folder (``flow_missing`` says)."""
    session, _ = session_of(svc, who, session_id)
    return await show(svc, session)


@router.patch("/sessions/{session_id}")
async def update_session(session_id: str, body: UpdateIn,
                         who: Principal = Depends(require("sessions:write")),
                         svc: Services = Depends(services)) -> dict:
    session, owner = session_of(svc, who, session_id)
    return await update(svc, who, session, owner, body)


@router.post("/sessions/{session_id}/stop")
async def stop_session(session_id: str, who: Principal = Depends(require("sessions:write")),
                       svc: Services = Depends(services)) -> dict:
    """Delete the session and release its compute; never needs the flow's folder."""
    session, owner = session_of(svc, who, session_id)
    return await stop(svc, who, session, owner)


@router.post("/sessions/{session_id}/reset", status_code=202)
async def reset_session(session_id: str, request: Request,
                        who: Principal = Depends(require("sessions:write")),
                        svc: Services = Depends(services)) -> dict:
    session, owner = session_of(svc, who, session_id)
    return await reset(request, svc, who, session, owner, session_id)


@router.post("/sessions/{session_id}/install", status_code=202)
async def install_session(session_id: str, request: Request,
                          who: Principal = Depends(require("sessions:write")),
                          svc: Services = Depends(services)) -> dict:
    """Save and install what the session's flow folder's requirements now say."""
    session, owner = session_of(svc, who, session_id)
    return await install(request, svc, who, session, owner, session_id)


@router.get("/sessions/{session_id}/events")
def session_events(session_id: str, who: Principal = Depends(require("sessions:read")),
                   svc: Services = Depends(services)) -> list[dict]:
    session, _ = session_of(svc, who, session_id)
    return [dataclasses.asdict(e) for e in svc.sessions.session_events(session)]


@router.get("/sessions/{session_id}/packages")
def session_packages(session_id: str, who: Principal = Depends(require("sessions:read")),
                     svc: Services = Depends(services)) -> list[dict]:
    session, _ = session_of(svc, who, session_id)
    return packages(svc, session)


@router.get("/sessions/{session_id}/logs")
async def session_logs(session_id: str,
                       tail_bytes: int = Query(LOG_TAIL_BYTES, ge=1, le=MAX_LOG_BYTES,
                                               description="at most this much of the log's "
                                               "end"),
                       who: Principal = Depends(require("sessions:read")),
                       svc: Services = Depends(services)) -> dict:
    """The end of the session's supervisor and worker log (text)."""
    session, _ = session_of(svc, who, session_id)
    text = await svc.sessions.session_logs(session, tail_bytes=tail_bytes)
    return {"session_id": session.id, "state": session.state, "text": text}

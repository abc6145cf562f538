"""Save and install: the flow's requirements installed into a new environment built beside the
running one, the session switched to it only when it is ready (atomic: on failure the session
keeps running unchanged). The sessions service's ``install_session`` is this; the words an
install's events say (what changed, what the image already provides) are here too."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from flowsession.backends.compute import procs
from flowsession.backends.compute.base import SessionHandle
from flowsession.environments.cache import Environment
from flowsession.environments.service import Prepared
from flowsession.errors import Conflict, FlowSessionError
from flowsession.sessions.records import Session
from flowsession.sessions.state import SessionState as S

if TYPE_CHECKING:
    from flowsession.sessions.service import SessionService


def check_install(svc: SessionService, session: Session) -> None:
    """Save and install needs a RUNNING session and its flow's folder (409 otherwise)."""
    if session.state != S.RUNNING:
        raise Conflict(f"session {session.id} is {session.state}: Save and install needs "
                       "a RUNNING session", hint="reset it, or start it again",
                       details={"state": session.state})
    svc.session_flow(session, needed_by="Save and install")


async def install_session(svc: SessionService, session: Session, *, actor: str) -> Session:
    """Save and install: build the new environment beside the running one; switch only
    when it is ready. On failure the session keeps running unchanged."""
    session = await svc.refresh(session)
    check_install(svc, session)
    session = svc.records.transition(session, S.INSTALLING, actor=actor,
                                     reason="installing the requirements",
                                     operator=procs.identity(), expect=[S.RUNNING])
    new_env: Environment | None = None
    new_handle: SessionHandle | None = None
    standby: asyncio.Task | None = None
    try:
        prepared = await svc.envs.prepare(session.flow,
                                          identity=svc._secrets_of(session),
                                          image=session.image)
        if prepared.env_id == session.env_id:
            return svc.records.transition(
                session, S.RUNNING, actor=actor, operator=None, expect=[S.INSTALLING],
                reason=_nothing_to_install(prepared))
        _still_installing(svc, session)  # a stop during the resolve releases the compute
        compute = svc.computes.get(session.compute_id, user=session.owner)
        standby = asyncio.create_task(svc.pool.claim_or_start(
            prepared.image.ref, compute=compute.compute_handle))
        new_env = await svc._environment(session, prepared,
                                         holder=f"{session.holder}:next")
        _still_installing(svc, session)
        new_handle = await svc._run_on(compute, session, prepared, new_env, await standby)
        standby = None
    except BaseException as exc:
        if standby is not None:
            await svc.pool.discard(standby)
        if new_env is not None:
            svc.envs.cache.release(new_env.id, f"{session.holder}:next")
        why = exc.message if isinstance(exc, FlowSessionError) else repr(exc)
        try:
            svc.records.transition(session, S.RUNNING, actor=actor, operator=None,
                                   reason=f"install failed, nothing changed: "
                                          f"{why.splitlines()[0]}", expect=[S.INSTALLING])
        except Conflict:
            pass  # stopped meanwhile: the stop cleaned up
        raise
    old = session
    try:
        session = svc.records.transition(
            session, S.RUNNING, actor=actor, reason="installed; switched to the new "
            f"environment {new_env.id}" + _provided(prepared), expect=[S.INSTALLING],
            operator=None,
            handle=new_handle.json_text(), env_id=new_env.id, snapshot_id=prepared.snapshot.id,
            last_activity_at=svc.clock())
    except Conflict:  # the session was stopped during the install: drop the new one
        await svc.backend.stop_session(new_handle, reason="session stopped during install")
        svc.envs.cache.release(new_env.id, f"{session.holder}:next")
        _still_installing(svc, session)
        raise
    svc.envs.cache.acquire(new_env.id, session.holder)
    svc.envs.cache.release(new_env.id, f"{session.holder}:next")
    if old.env_id and old.env_id != new_env.id:
        svc.envs.cache.release(old.env_id, session.holder)
    if old.session_handle:
        await svc.backend.stop_session(old.session_handle, reason="replaced by install")
    return session


def _still_installing(svc: SessionService, session: Session) -> None:
    state = svc.records.get(session.id).state
    if state != S.INSTALLING:
        raise Conflict(f"session {session.id} was stopped during the install (it is {state})",
                       hint="start it again: flowsession session start FLOW",
                       details={"state": state})


def _nothing_to_install(prepared: Prepared) -> str:
    """Why Save and install changed nothing: the packages the image already provides (with
    the image's versions), else the requirements are as installed."""
    provided = _provided(prepared)
    if not provided:
        return "nothing to install: the requirements are unchanged"
    return f"nothing to install{provided}; the environment is unchanged"


def _provided(prepared: Prepared) -> str:
    found = prepared.provided_by_image()
    listed = ", ".join(f"{n} {v}" for n, v in sorted(found.items()))
    return f": the image {prepared.image.ref} already provides {listed}" if found else ""

"""A server's orderly stop (SIGTERM, Ctrl-C, ``flowsession server stop``) stops the sessions it
runs, through the same stop the API uses: each record says STOPPED and why, with an event, so
that the next server shows them as they are. A crash stops nothing: the next server takes the
sessions up (``Sweeper``)."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from flowsession.backends.compute import procs
from flowsession.errors import Conflict
from flowsession.sessions.records import ACTIVE_STATES, Session

if TYPE_CHECKING:
    from flowsession.sessions.service import SessionService

log = logging.getLogger("flowsession.server")
SERVER = "system:server"
STOPPED_WITH_THE_SERVER = "the server was stopped"


async def stop_all(svc: SessionService, *, reason: str = STOPPED_WITH_THE_SERVER
                   ) -> list[Session]:
    """Stop every unfinished session, all at once (each stop on its own: one that fails is
    logged, and never keeps the others running). A session another live process is still
    working on (its start or install, not this server's) is left to that process. Returns the
    sessions stopped."""
    me = procs.identity()
    sessions = [s for s in svc.records.list(owner=None, states=ACTIVE_STATES)
                if not s.operator or s.operator == me or not procs.identity_alive(s.operator)]

    async def one(session: Session) -> Session | None:
        try:
            return await svc.stop_session(session, actor=SERVER, reason=reason)
        except Conflict:
            return None  # it moved on meanwhile (stopped by its own start's cleanup)
        except Exception:  # noqa: BLE001 - logged; the others are stopped regardless
            log.exception("stopping session %s with the server failed", session.id)
            return None

    stopped = await asyncio.gather(*(one(s) for s in sessions))
    return [s for s in stopped if s is not None]

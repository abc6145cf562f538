"""The reconciler and the idle culler. The database is a belief: the reconciler asks the backend
what really runs and corrects it; the culler stops what has been idle for its idle time, through
the same stop the API uses. Without a server, every CLI command sweeps first."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from flowsession.backends.compute import procs
from flowsession.backends.compute.base import BackendState, BackendStatus
from flowsession.config import format_duration
from flowsession.errors import Conflict
from flowsession.sessions.records import ACTIVE_STATES, Session
from flowsession.sessions.state import LIVE, IdleView, SessionState as S, should_stop

if TYPE_CHECKING:
    from flowsession.sessions.service import SessionService

log = logging.getLogger("flowsession.sweep")
RECONCILER = "system:reconciler"
CULLER = "system:idle-culler"


class Sweeper:
    def __init__(self, service: SessionService):
        self.svc = service

    async def sweep(self) -> None:
        """Reconcile every unfinished session, stop orphans, cull idle sessions, shut down
        idle instances."""
        records = self.svc.records
        sessions = records.list(owner=None, states=ACTIVE_STATES)
        statuses = await self.statuses(sessions)
        for session in sessions:
            if session.id in statuses and statuses[session.id] is None:
                continue  # looking at it failed (logged): the next sweep tries again
            try:  # one session's failure (it runs hostile code) never stops the others' sweep
                await self.reconcile_one(session, status=statuses.get(session.id))
            except Exception:  # noqa: BLE001 - logged; the next sweep tries it again
                log.exception("reconciling session %s failed", session.id)
        await self.stop_orphans()
        await self.cull(statuses)

    async def statuses(self, sessions: list[Session]) -> dict[str, BackendStatus | None]:
        """What the backend says of each live session, asked of all of them at once: a
        session slow to answer (or hostile, never answering) costs its own timeout, not the
        sum of everyone's. None for a session that could not be looked at."""
        backend = self.svc.backend

        async def one(session: Session) -> tuple[str, BackendStatus | None]:
            try:
                return session.id, await backend.status(session.session_handle)
            except Exception:  # noqa: BLE001 - logged; the others are still looked at
                log.exception("looking at session %s failed", session.id)
                return session.id, None

        live = [s for s in sessions if s.state in LIVE and s.session_handle is not None
                and s.operator is None]
        return dict(await asyncio.gather(*(one(s) for s in live)))

    async def stop_orphans(self) -> list[str]:
        """Stop supervisors that no session or standby refers to. Only while no operation is
        under way: a start in progress has spawned a supervisor it has not recorded yet."""
        svc = self.svc
        unfinished = svc.records.list(owner=None, states=ACTIVE_STATES)
        if any(s.operator and procs.identity_alive(s.operator) for s in unfinished):
            return []
        known = {s.session_handle.slot for s in unfinished if s.session_handle}
        known |= {h.slot for h in svc.pool.members()}
        stopped = []
        for handle in svc.backend.orphans(known):
            log.warning("stopping an orphaned session (%s): no session or standby refers to "
                        "it (known: %s)", handle.slot, sorted(known))
            await svc.backend.stop_session(handle, reason="orphaned: no session refers to it")
            stopped.append(handle.slot)
        return stopped

    async def reconcile_one(self, session: Session, *,
                            status: BackendStatus | None = None) -> None:
        """Correct the belief about ``session`` (``status``: the backend's, if just asked)."""
        try:
            await self._reconcile(session, status)
        except Conflict:
            pass  # it moved on while we looked: the next sweep sees the new state

    async def _reconcile(self, session: Session, status: BackendStatus | None) -> None:
        svc = self.svc
        handle = session.session_handle
        if session.state in LIVE and handle is not None and session.operator is None:
            status = status or await svc.backend.status(handle)
            if status.state == BackendState.EXITED:
                await svc._stop(session, actor=RECONCILER, reason=status.detail or "ended")
            elif status.state == BackendState.LOST:
                svc.records.transition(session, S.FAILED, actor=RECONCILER,
                                       reason=f"lost: {status.detail}")
            elif status.failed:
                svc.records.transition(session, S.FAILED, actor=RECONCILER,
                                       reason=svc.held.explain(session, status.detail))
            elif status.note:
                note = svc.held.explain(session, status.note)
                if not any(e.reason == note for e in svc.records.events([session.id])):
                    svc.records.note(session.id, actor=RECONCILER, reason=note)
            return
        if session.operator and not procs.identity_alive(session.operator):
            # the process doing this session's pending work is gone (the control plane died)
            if session.state == S.INSTALLING:
                svc.records.transition(session, S.RUNNING, actor=RECONCILER, operator=None,
                                       reason="the install was interrupted; nothing changed")
                return
            why = f"the control plane stopped during {session.state.lower()}"
            if session.state == S.STOPPING:
                why = session.reason or why
            await svc._stop(session, actor=RECONCILER, reason=why)

    async def cull(self, statuses: dict[str, BackendStatus | None] | None = None) -> None:
        """Stop what has been idle for its idle time (``statuses``: the backend's views of
        this sweep, asked again for sessions not among them)."""
        svc = self.svc
        now = svc.clock()
        statuses = dict(statuses or {})
        running = [s for s in svc.records.list(owner=None, states=[S.RUNNING])
                   if s.session_handle is not None]
        statuses.update(await self.statuses([s for s in running if s.id not in statuses]))
        for session in running:
            status = statuses.get(session.id)
            if status is None:
                continue
            idle = min(now - session.last_activity_at, status.idle_seconds)
            view = IdleView(S.RUNNING, now - idle, session.idle_timeout_s, status.busy)
            if status.state == BackendState.RUNNING and should_stop(view, now):
                await svc._stop(session, actor=CULLER,
                                reason=f"idle for {format_duration(round(idle))} "
                                       f"(idle time {format_duration(session.idle_timeout_s)})")
        for compute in svc.computes.idle_instances(now):
            await svc.stop_compute(compute, actor=CULLER,
                                   reason=f"idle shutdown after "
                                          f"{format_duration(compute.idle_shutdown_s or 0)}")

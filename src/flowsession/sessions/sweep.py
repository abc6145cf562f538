"""The reconciler and the idle culler. The database is a belief: the reconciler asks the backend
what really runs and corrects it; the culler stops what has been idle for its idle time, through
the same stop the API uses. Without a server, every CLI command sweeps first."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from flowsession.backends.compute import procs
from flowsession.backends.compute.base import BackendState
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
        for session in records.list(owner=None, states=ACTIVE_STATES):
            try:  # one session's failure (it runs hostile code) never stops the others' sweep
                await self.reconcile_one(session)
            except Exception:  # noqa: BLE001 - logged; the next sweep tries it again
                log.exception("reconciling session %s failed", session.id)
        await self.stop_orphans()
        await self.cull()

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

    async def reconcile_one(self, session: Session) -> None:
        try:
            await self._reconcile(session)
        except Conflict:
            pass  # it moved on while we looked: the next sweep sees the new state

    async def _reconcile(self, session: Session) -> None:
        svc = self.svc
        handle = session.session_handle
        if session.state in LIVE and handle is not None and session.operator is None:
            status = await svc.backend.status(handle)
            if status.state == BackendState.EXITED:
                await svc._stop(session, actor=RECONCILER, reason=status.detail or "ended")
            elif status.state == BackendState.LOST:
                svc.records.transition(session, S.FAILED, actor=RECONCILER,
                                       reason=f"lost: {status.detail}")
            elif status.failed:
                svc.records.transition(session, S.FAILED, actor=RECONCILER, reason=status.detail)
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

    async def cull(self) -> None:
        svc = self.svc
        now = svc.clock()
        for session in svc.records.list(owner=None, states=[S.RUNNING]):
            handle = session.session_handle
            if handle is None:
                continue
            try:
                status = await svc.backend.status(handle)
            except Exception:  # noqa: BLE001 - as in sweep(): the others are still culled
                log.exception("looking at session %s failed", session.id)
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

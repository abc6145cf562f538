"""Many flows, one machine: when a session started implicitly (by a test line or a run) would
exceed the vCPU quota, the starting user's own idle serverless sessions are reclaimed, least
recently used first, each with an event naming why. When nothing can be reclaimed (or the
start was asked for explicitly), the refusal lists what holds the quota and how to stop it.

A session is idle when it is RUNNING, runs no batch run, and has no test line in flight
(``Busy``, counted by the sessions service around each line)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import contextmanager
from typing import TYPE_CHECKING

from sqlalchemy import select

from flowsession.computes.service import Compute, ComputeKind, ComputeState
from flowsession.errors import QuotaExceeded
from flowsession.sessions.records import ACTIVE_STATES, Session
from flowsession.sessions.state import SessionState as S
from flowsession.store.tables import runs

if TYPE_CHECKING:
    from flowsession.backends.compute.base import VmSize
    from flowsession.sessions.service import SessionService

_ACTIVE_RUNS = ("Preparing", "Running", "Canceling")  # runs.records.ACTIVE, as stored
_LISTED = 10


class Busy:
    """Test lines in flight per session (this control plane's own)."""

    def __init__(self) -> None:
        self._lines: Counter[str] = Counter()

    @contextmanager
    def line(self, session_id: str):
        self._lines[session_id] += 1
        try:
            yield
        finally:
            self._lines[session_id] -= 1
            if self._lines[session_id] <= 0:
                del self._lines[session_id]

    def __contains__(self, session_id: str) -> bool:
        return self._lines.get(session_id, 0) > 0


def _running_runs(svc: SessionService) -> dict[str, str]:
    """session id -> the name of a run it runs now."""
    q = select(runs.c.session_id, runs.c.name).where(runs.c.status.in_(_ACTIVE_RUNS),
                                                     runs.c.session_id.is_not(None))
    with svc.store.engine.connect() as c:
        return {sid: name for sid, name in c.execute(q)}


def reclaimable(svc: SessionService, owner: str, *, starting: str) -> list[Session]:
    """``owner``'s idle serverless sessions, least recently used first."""
    busy_runs = _running_runs(svc)
    found = [s for s in svc.records.list(owner=owner, states=[S.RUNNING])
             if s.compute_type == ComputeKind.SERVERLESS and s.id != starting
             and s.compute_id and s.id not in busy_runs and s.id not in svc.busy]
    return sorted(found, key=lambda s: s.last_activity_at)


async def provision_with_reclaim(svc: SessionService, session: Session, size: VmSize,
                                 provision: Callable[[], Awaitable[Compute]], *,
                                 reclaim: bool) -> Compute:
    """``provision()``; over the quota, with ``reclaim`` (a start by a test line or a run),
    reclaim ``session.owner``'s idle serverless sessions (LRU first) until ``size`` fits and
    try again; else refuse saying what holds the quota. A start asked for explicitly
    (``session start``) reclaims nothing: its refusal says what to stop."""
    try:
        return await provision()
    except QuotaExceeded as exc:
        if not reclaim:
            raise _refusal(svc, session, size, exc, reclaimed=False) from None
    quota = svc.computes.quota
    for victim in reclaimable(svc, session.owner, starting=session.id):
        free = quota - svc.computes.vcpu_in_use()
        if free >= size.vcpu:
            break
        idle_s = max(0.0, svc.clock() - victim.last_activity_at)
        await svc.stop_session(
            victim, actor="system:quota",
            reason=f"reclaimed: its {victim.vm_size} VM size's vCPUs were needed to start "
                   f"session {session.id} for flow {session.flow} (the vCPU quota of "
                   f"{quota:g} was full; this was {session.owner}'s least recently used idle "
                   f"session, unused for {idle_s:.0f} s)")
    try:
        return await provision()
    except QuotaExceeded as exc:
        raise _refusal(svc, session, size, exc, reclaimed=True) from None


def _refusal(svc: SessionService, session: Session, size: VmSize,
             exc: QuotaExceeded, *, reclaimed: bool) -> QuotaExceeded:
    busy_runs = _running_runs(svc)
    holders: list[str] = []
    others = 0.0
    by_compute = {c.id: c for c in svc.computes.list(user=None)}
    for s in svc.records.list(owner=None, states=ACTIVE_STATES):
        compute = by_compute.get(s.compute_id or "")
        if s.id == session.id or compute is None or compute.kind != ComputeKind.SERVERLESS:
            continue
        if s.owner != session.owner:
            others += compute.vcpu
            continue
        doing = (f"running run {busy_runs[s.id]}" if s.id in busy_runs
                 else "testing a line" if s.id in svc.busy else s.state)
        holders.append(f"session {s.id} ({s.flow}, {compute.vm_size}, {compute.vcpu:g} vCPU, "
                       f"{doing}): flowsession session stop {s.id}")
    for compute in by_compute.values():
        if compute.kind != ComputeKind.INSTANCE or compute.state != ComputeState.RUNNING:
            continue
        if compute.owner != session.owner:
            others += compute.vcpu
            continue
        holders.append(f"compute instance {compute.name} ({compute.vm_size}, "
                       f"{compute.vcpu:g} vCPU): flowsession compute stop {compute.name}")
    listed = "; ".join(holders[:_LISTED]) + (f"; and {len(holders) - _LISTED} more"
                                             if len(holders) > _LISTED else "")
    message = exc.message + (f". Held by: {listed}" if holders else "")
    if others:
        message += f" ({others:g} vCPU are other users')"
    hint = (("none of your sessions is idle (each runs a run or a line): stop one of them "
             "(commands above), or wait for a run to end") if holders and reclaimed else
            "stop one of them (commands above)" if holders else
            "the quota is held by other users' sessions: ask them or the server's admin "
            "(FLOWSESSION_VCPU_QUOTA)")
    return QuotaExceeded(
        message, hint=hint + "; or pick a smaller VM size (flowsession compute sizes)",
        details={"vm_size": size.name, "quota": svc.computes.quota,
                 "holders": holders[:_LISTED]})

"""Session rows, the one place their state changes, their events, and flow bindings.
The sessions service is the only writer of ``sessions``, ``session_events``, ``flow_bindings``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from flowsession.errors import Conflict, NotFound
from flowsession.sessions.model import (  # noqa: F401  (re-exported)
    SESSION_ID,
    Session,
    looks_like_session_id,
    new_session_id,
)
from flowsession.sessions.state import ACTIVE, SessionState, can_transition
from flowsession.store import Store
from flowsession.store.tables import flow_bindings, session_events, sessions


@dataclass(frozen=True)
class Event:
    session_id: str
    at: float
    actor: str
    from_state: str | None
    to_state: str
    reason: str


class SessionRecords:
    def __init__(self, store: Store, clock: Callable[[], float] = time.time):
        self.store, self.clock = store, clock

    # --- reading ---------------------------------------------------------------------------

    def get(self, session_id: str) -> Session:
        with self.store.engine.connect() as c:
            row = c.execute(select(sessions).where(sessions.c.id == session_id)).first()
        if row is None:
            raise NotFound(f"session {session_id} does not exist")
        return Session(**row._mapping)

    def bound_to(self, flow: str) -> Session | None:
        with self.store.engine.connect() as c:
            row = c.execute(select(sessions).join(
                flow_bindings, flow_bindings.c.session_id == sessions.c.id)
                .where(flow_bindings.c.flow == flow)).first()
        return Session(**row._mapping) if row else None

    def list(self, *, owner: str | None, states: Iterable[str] | None = None) -> list[Session]:
        q = select(sessions).order_by(sessions.c.created_at)
        if owner is not None:
            q = q.where(sessions.c.owner == owner)
        if states is not None:
            q = q.where(sessions.c.state.in_(list(states)))
        with self.store.engine.connect() as c:
            return [Session(**r._mapping) for r in c.execute(q)]

    def events(self, session_ids: Iterable[str]) -> list[Event]:
        q = (select(session_events).where(session_events.c.session_id.in_(list(session_ids)))
             .order_by(session_events.c.id))
        with self.store.engine.connect() as c:
            return [Event(r.session_id, r.at, r.actor, r.from_state, r.to_state, r.reason)
                    for r in c.execute(q)]

    def history(self, flow: str) -> list[str]:
        """Every session id the flow has had, oldest first."""
        with self.store.engine.connect() as c:
            return [r.id for r in c.execute(select(sessions.c.id).where(sessions.c.flow == flow)
                                            .order_by(sessions.c.created_at))]

    # --- writing ---------------------------------------------------------------------------

    def create_bound(self, *, flow: str, actor: str, **values) -> tuple[Session, bool]:
        """A new session bound to ``flow`` — or the one already bound (one flow, one session).
        Returns (session, created)."""
        session_id = new_session_id()
        now = self.clock()
        try:
            with self.store.engine.begin() as c:
                c.execute(insert(flow_bindings).values(flow=flow, session_id=session_id))
                c.execute(insert(sessions).values(
                    id=session_id, flow=flow, state=SessionState.NOT_STARTED, created_at=now,
                    updated_at=now, last_activity_at=now, **values))
                c.execute(insert(session_events).values(
                    session_id=session_id, at=now, actor=actor, from_state=None,
                    to_state=SessionState.NOT_STARTED, reason="start requested"))
        except IntegrityError:
            existing = self.bound_to(flow)
            if existing is None:  # unbound between our insert and this read: try once more
                return self.create_bound(flow=flow, actor=actor, **values)
            return existing, False
        return self.get(session_id), True

    def transition(self, session: Session | str, to: SessionState, *, actor: str, reason: str,
                   expect: Iterable[str] | None = None, **values) -> Session:
        """Move a session to ``to`` if its state allows it, in one guarded UPDATE, and log it.
        ``expect`` narrows the states it may come from (default: any that may go to ``to``)."""
        sid = session if isinstance(session, str) else session.id
        current = self.get(sid)
        sources = [s for s in (expect or [current.state])
                   if can_transition(SessionState(s), to)]
        now = self.clock()
        with self.store.engine.begin() as c:
            n = c.execute(update(sessions).where(sessions.c.id == sid,
                                                 sessions.c.state.in_(sources))
                          .values(state=to, updated_at=now, reason=reason, **values)).rowcount
            if n == 1:
                c.execute(insert(session_events).values(
                    session_id=sid, at=now, actor=actor, from_state=current.state, to_state=to,
                    reason=reason))
        if n != 1:
            state = self.get(sid).state
            raise Conflict(f"session {sid} is {state}: it cannot go to {to}",
                           hint=_hint_for(state), details={"state": state})
        return self.get(sid)

    def note(self, session_id: str, *, actor: str, reason: str) -> None:
        """Something happened that changes no state (a worker died and was replaced): an
        event, and the session's reason."""
        now = self.clock()
        with self.store.engine.begin() as c:
            row = c.execute(select(sessions.c.state).where(sessions.c.id == session_id)).first()
            if row is None:
                return
            c.execute(update(sessions).where(sessions.c.id == session_id)
                      .values(updated_at=now, reason=reason))
            c.execute(insert(session_events).values(
                session_id=session_id, at=now, actor=actor, from_state=row.state,
                to_state=row.state, reason=reason))

    def set(self, session_id: str, **values) -> None:
        with self.store.engine.begin() as c:
            c.execute(update(sessions).where(sessions.c.id == session_id)
                      .values(updated_at=self.clock(), **values))

    def set_and_get(self, session_id: str, **values) -> Session:
        self.set(session_id, **values)
        return self.get(session_id)

    def touch(self, session_id: str) -> None:
        with self.store.engine.begin() as c:
            c.execute(update(sessions).where(sessions.c.id == session_id)
                      .values(last_activity_at=self.clock()))

    def unbind(self, session: Session) -> None:
        with self.store.engine.begin() as c:
            c.execute(delete(flow_bindings).where(flow_bindings.c.flow == session.flow,
                                                  flow_bindings.c.session_id == session.id))


def _hint_for(state: str) -> str:
    return {
        SessionState.FAILED: "reset it (flowsession session reset FLOW) or stop it",
        SessionState.STOPPED: "start a new session: flowsession session start FLOW",
        SessionState.INSTALLING: "wait for the install to finish (flowsession session show FLOW)",
        SessionState.BUILDING: "wait for the start to finish (flowsession session show FLOW)",
        SessionState.STARTING: "wait for the start to finish (flowsession session show FLOW)",
    }.get(state, "see flowsession session show FLOW")


ACTIVE_STATES = [str(s) for s in ACTIVE]

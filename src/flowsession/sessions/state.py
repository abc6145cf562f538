"""Session states, the transitions between them, and the idle rule. Pure: no I/O."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum


class SessionState(StrEnum):
    NOT_STARTED = "NOT_STARTED"
    BUILDING = "BUILDING"  # resolving and building the environment
    STARTING = "STARTING"  # the supervisor is starting and loading the flow
    RUNNING = "RUNNING"
    INSTALLING = "INSTALLING"  # Save and install: a new environment is built beside the old
    RESETTING = "RESETTING"
    STOPPING = "STOPPING"
    STOPPED = "STOPPED"
    FAILED = "FAILED"  # still bound to its flow: reset recovers it, stop removes it


S = SessionState
TRANSITIONS: Mapping[SessionState, frozenset[SessionState]] = {
    S.NOT_STARTED: frozenset({S.BUILDING, S.STOPPING}),
    S.BUILDING: frozenset({S.STARTING, S.FAILED, S.STOPPING}),
    S.STARTING: frozenset({S.RUNNING, S.FAILED, S.STOPPING}),
    S.RUNNING: frozenset({S.INSTALLING, S.RESETTING, S.STOPPING, S.FAILED}),
    S.INSTALLING: frozenset({S.RUNNING, S.STOPPING, S.FAILED}),
    S.RESETTING: frozenset({S.BUILDING, S.FAILED, S.STOPPING}),
    S.STOPPING: frozenset({S.STOPPED}),
    S.STOPPED: frozenset(),
    S.FAILED: frozenset({S.RESETTING, S.STOPPING}),
}
#: States in which a supervisor may be running (the reconciler checks these).
LIVE = frozenset({S.STARTING, S.RUNNING, S.INSTALLING})
#: States of a session still bound to its flow.
ACTIVE = frozenset(SessionState) - {S.STOPPED}
#: States in which work is pending: never culled, whatever the clock says.
BUSY = frozenset({S.NOT_STARTED, S.BUILDING, S.STARTING, S.INSTALLING, S.RESETTING, S.STOPPING})


def can_transition(src: SessionState, dst: SessionState) -> bool:
    return dst in TRANSITIONS[src]


@dataclass(frozen=True)
class IdleView:
    """What the culler knows of a session."""

    state: SessionState
    last_activity_at: float
    idle_timeout_s: float
    lines_running: int = 0


def should_stop(session: IdleView, now: float) -> bool:
    """Idle for its idle time, with nothing running: delete it. A busy session never is."""
    if session.state != SessionState.RUNNING or session.lines_running > 0:
        return False
    if session.idle_timeout_s <= 0:
        return False
    return now - session.last_activity_at >= session.idle_timeout_s

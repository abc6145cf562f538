"""A run and its statuses as plain values: what the store keeps and the client reads back.
No store or SQLAlchemy here, so the CLI and SDK can use them cheaply."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

# Lines in flight when a run says nothing (--max-concurrency, resources.max_concurrency, or
# PF_WORKER_COUNT): LLM flows wait on their endpoint, so a session keeps many lines going
# whatever its cores; 64 keeps a 0.1-2 s endpoint busy (~30-600 requests/s) and 429s lower it.
DEFAULT_CONCURRENCY = 64
NEAR_END_LOOK_S = 0.05  # how often a run whose last lines are in flight is looked at


class RunStatus(StrEnum):
    """A run's status, in prompt flow's words."""

    PREPARING = "Preparing"  # its inputs being stored; not submitted to a session yet
    RUNNING = "Running"
    CANCELING = "Canceling"  # asked to stop: its session is told, it ends as Canceled
    COMPLETED = "Completed"  # every line ran (some may have failed: a line never fails a run)
    FAILED = "Failed"  # it could not run, or its aggregation failed
    CANCELED = "Canceled"


S = RunStatus
TRANSITIONS: Mapping[RunStatus, frozenset[RunStatus]] = {
    S.PREPARING: frozenset({S.RUNNING, S.FAILED, S.CANCELED}),
    # RUNNING again: submitted again, to a new session, for the lines without a result
    S.RUNNING: frozenset({S.RUNNING, S.CANCELING, S.COMPLETED, S.FAILED, S.CANCELED}),
    # a cancel that comes as the run ends lets it end as it would have
    S.CANCELING: frozenset({S.CANCELED, S.COMPLETED, S.FAILED}),
    S.COMPLETED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELED: frozenset(),
}
ACTIVE = frozenset({S.PREPARING, S.RUNNING, S.CANCELING})
ENDED = frozenset({S.COMPLETED, S.FAILED, S.CANCELED})


def sources(status: RunStatus) -> frozenset[RunStatus]:
    """The statuses a run may change to ``status`` from."""
    return frozenset(src for src, dsts in TRANSITIONS.items() if status in dsts)


class LineStatus(StrEnum):
    """A line's status in a run's details."""

    NOT_STARTED = "NotStarted"
    COMPLETED = "Completed"
    FAILED = "Failed"


@dataclass(frozen=True)
class Run:
    name: str
    owner: str
    flow: str
    display_name: str
    description: str
    tags: dict[str, str]
    status: RunStatus
    spec: dict[str, Any]
    session_id: str | None
    total: int
    completed: int
    failed: int
    errors: list[list[Any]]  # [[line_number, message], ...]: the first few
    error: str | None
    operator: str | None
    created_at: float
    started_at: float | None
    ended_at: float | None
    # from the run's files, not its row (the API adds them): pf's system metrics (token
    # counts, duration) and what the session said of the endpoint's rate limits
    system_metrics: dict[str, Any] | None = None
    throttle: dict[str, Any] | None = None

    @property
    def duration(self) -> float | None:
        if self.started_at is None:
            return None
        return (self.ended_at or time.time()) - self.started_at

    def look_again_s(self, every: float) -> float:
        """How long to wait before looking at this active run again: ``every``, or
        ``NEAR_END_LOOK_S`` once all its remaining lines can be in flight (its end is then
        seen at once, for the price of a few more looks). A ``PF_WORKER_COUNT`` in the run's
        environment (kept apart from its spec) is not seen here: such a run is looked at
        more often for its last ``DEFAULT_CONCURRENCY`` lines, nothing more."""
        in_flight = int(self.spec.get("max_concurrency") or DEFAULT_CONCURRENCY)
        left = self.total - self.completed - self.failed
        return NEAR_END_LOOK_S if self.status == RunStatus.RUNNING and left <= in_flight \
            else every

    def summary(self) -> str:
        """'98 of 100 lines completed, 2 failed' and the like."""
        done = self.completed + self.failed
        text = f"{self.completed} of {self.total} line(s) completed"
        if self.failed:
            text += f", {self.failed} of {self.total} failed"
        if self.status in ACTIVE and done < self.total:
            text += f" ({self.total - done} to go)"
        skipped = self.spec.get("skipped_lines")
        if skipped:
            count = self.spec.get("skipped_count") or len(skipped)
            more = f" and {count - len(skipped)} more" if count > len(skipped) else ""
            text += (f"; {count} malformed data line(s) skipped: line "
                     f"{', '.join(map(str, skipped))}{more}")
        return text

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.pop("operator")
        d["duration"] = self.duration
        d["summary"] = self.summary()
        return d

"""The ``runs`` table: a run's record and summary. Only the runs service writes it."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError

from flowsession.errors import Conflict, NotFound
from flowsession.store import Store
from flowsession.store.tables import runs


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


def _row(r: Any) -> Run:
    return Run(name=r.name, owner=r.owner, flow=r.flow, display_name=r.display_name,
               description=r.description, tags=json.loads(r.tags or "{}"),
               status=RunStatus(r.status),
               spec=json.loads(r.spec), session_id=r.session_id, total=r.total,
               completed=r.completed, failed=r.failed, errors=json.loads(r.errors or "[]"),
               error=r.error, operator=r.operator, created_at=r.created_at,
               started_at=r.started_at, ended_at=r.ended_at)


class RunRecords:
    def __init__(self, store: Store, clock: Callable[[], float] = time.time):
        self.store, self.clock = store, clock

    def create(self, *, name: str, owner: str, flow: str, spec: dict[str, Any], total: int,
               display_name: str, description: str, tags: dict[str, str],
               operator: str | None) -> Run:
        try:
            with self.store.engine.begin() as conn:
                conn.execute(insert(runs).values(
                    name=name, owner=owner, flow=flow, display_name=display_name,
                    description=description, tags=json.dumps(tags), status=S.PREPARING,
                    spec=json.dumps(spec), total=total, completed=0, failed=0, errors="[]",
                    operator=operator, created_at=self.clock()))
        except IntegrityError:
            raise Conflict(f"a run named {name!r} exists",
                           hint="choose another --name, or leave it out for a generated one",
                           details={"run": name}) from None
        return self.get(name)

    def find(self, name: str) -> Run | None:
        with self.store.engine.connect() as conn:
            r = conn.execute(select(runs).where(runs.c.name == name)).first()
        return _row(r) if r else None

    def get(self, name: str, *, owner: str | None = None) -> Run:
        """The run; another owner's run is NotFound, like a missing one."""
        run = self.find(name)
        if run is None or (owner is not None and run.owner != owner):
            raise NotFound(f"run {name!r} does not exist",
                           hint="list the runs: flowsession run list", details={"run": name})
        return run

    def list(self, *, owner: str | None, statuses: Iterable[str] | None = None,
             limit: int | None = None, offset: int = 0) -> list[Run]:
        q = select(runs).order_by(runs.c.created_at.desc(), runs.c.name)
        if owner is not None:
            q = q.where(runs.c.owner == owner)
        if statuses is not None:
            q = q.where(runs.c.status.in_(list(statuses)))
        if limit:
            q = q.limit(limit)
        if offset:
            q = q.offset(offset)
        with self.store.engine.connect() as conn:
            return [_row(r) for r in conn.execute(q)]

    def transition(self, name: str, status: RunStatus, *,
                   expect: Iterable[RunStatus] | None = None, **values: Any) -> bool:
        """Change the run's status (and ``values``) if ``TRANSITIONS`` allows it from the
        status it has now (and that is one of ``expect``, when given). True if done."""
        allowed = sources(status) if expect is None else sources(status) & set(expect)
        return self._update(name, allowed, status=status, **values)

    def set(self, name: str, **values: Any) -> None:
        """Update fields other than the status (``transition`` changes that)."""
        if "status" in values:
            raise ValueError("a run's status changes only by transition()")
        self._update(name, None, **values)

    def _update(self, name: str, expect: Iterable[str] | None, **values: Any) -> bool:
        """Update fields (``expect``: only while the status is one of these). True if done."""
        for key in ("errors", "tags", "spec"):
            if key in values and not isinstance(values[key], str):
                values[key] = json.dumps(values[key])
        q = update(runs).where(runs.c.name == name)
        if expect is not None:
            q = q.where(runs.c.status.in_(list(expect)))
        with self.store.engine.begin() as conn:
            return conn.execute(q.values(**values)).rowcount == 1

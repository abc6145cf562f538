"""The ``runs`` table: a run's record and summary. Only the runs service writes it."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError

from flowsession.errors import Conflict, NotFound
from flowsession.store import Store
from flowsession.store.tables import runs

PREPARING, RUNNING, COMPLETED, FAILED, CANCELING, CANCELED = (
    "Preparing", "Running", "Completed", "Failed", "Canceling", "Canceled")
ACTIVE = (PREPARING, RUNNING, CANCELING)
ENDED = (COMPLETED, FAILED, CANCELED)


@dataclass(frozen=True)
class Run:
    name: str
    owner: str
    flow: str
    display_name: str
    description: str
    tags: dict[str, str]
    status: str
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
        return text

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.pop("operator")
        d["duration"] = self.duration
        d["summary"] = self.summary()
        return d


def _row(r: Any) -> Run:
    return Run(name=r.name, owner=r.owner, flow=r.flow, display_name=r.display_name,
               description=r.description, tags=json.loads(r.tags or "{}"), status=r.status,
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
                    description=description, tags=json.dumps(tags), status=PREPARING,
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
             limit: int | None = None) -> list[Run]:
        q = select(runs).order_by(runs.c.created_at.desc())
        if owner is not None:
            q = q.where(runs.c.owner == owner)
        if statuses is not None:
            q = q.where(runs.c.status.in_(list(statuses)))
        if limit:
            q = q.limit(limit)
        with self.store.engine.connect() as conn:
            return [_row(r) for r in conn.execute(q)]

    def set(self, name: str, *, expect: Iterable[str] | None = None, **values: Any) -> bool:
        """Update fields (``expect``: only while the status is one of these). True if done."""
        for key in ("errors", "tags", "spec"):
            if key in values and not isinstance(values[key], str):
                values[key] = json.dumps(values[key])
        q = update(runs).where(runs.c.name == name)
        if expect is not None:
            q = q.where(runs.c.status.in_(list(expect)))
        with self.store.engine.begin() as conn:
            return conn.execute(q.values(**values)).rowcount == 1

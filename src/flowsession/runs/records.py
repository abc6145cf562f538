"""The ``runs`` table: a run's record and summary. Only the runs service writes it."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError

from flowsession.errors import Conflict, NotFound
from flowsession.runs.model import (  # noqa: F401  (re-exported: the records speak of them)
    ACTIVE,
    ENDED,
    TRANSITIONS,
    LineStatus,
    Run,
    RunStatus,
    S,
    sources,
)
from flowsession.store import Store
from flowsession.store.tables import runs


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

"""Long operations: an image build, a session start or install, a run. The request returns at
once with an operation id; the work goes on in the server, its progress is kept in memory for
server-sent events, and its outcome in the ``operations`` table. A server that restarts marks
the operations its predecessor left running as failed, with the reason: none hangs."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from sqlalchemy import insert, select, update

from flowsession.api.operation_status import ENDED, OperationStatus
from flowsession.backends.compute import procs
from flowsession.errors import FlowSessionError, NotFound
from flowsession.store import Store
from flowsession.store.tables import operations

log = logging.getLogger("flowsession.server")
Emit = Callable[[dict[str, Any]], None]
KEEP_EVENTS_S = 300.0


class Operations:
    def __init__(self, store: Store):
        self.store = store
        self.server = procs.identity()
        self.tasks: dict[str, asyncio.Task] = {}
        self.events: dict[str, list[dict[str, Any]]] = {}
        self.changed: dict[str, asyncio.Event] = {}

    def recover(self, followers: dict[str, Callable[[str], Callable[[Emit], Awaitable[Any]]]]
                | None = None) -> int:
        """Operations left running by a server that is gone. Those whose work goes on without
        the server (``followers``: kind -> resource -> work, e.g. a run, which its session
        executes) are followed again to their end; the rest are failed, saying why."""
        followers = followers or {}
        with self.store.engine.begin() as conn:
            rows = conn.execute(select(operations).where(
                operations.c.status == OperationStatus.RUNNING)).all()
            dead = [r for r in rows if r.server != self.server
                    and not procs.identity_alive(r.server)]
            for r in dead:
                if r.kind in followers:
                    conn.execute(update(operations).where(operations.c.id == r.id)
                                 .values(server=self.server))
                    continue
                conn.execute(update(operations).where(operations.c.id == r.id).values(
                    status=OperationStatus.FAILED, ended_at=time.time(), error=json.dumps({
                        "code": "interrupted", "message": "the server restarted while this "
                        "operation ran", "hint": "look at the resource's state and try again"})))
        for r in dead:
            if r.kind in followers:
                self._follow(r.id, r.kind, r.resource, followers[r.kind](r.resource))
        return len(dead)

    def start(self, kind: str, resource: str, owner: str,
              work: Callable[[Emit], Awaitable[Any]]) -> dict[str, Any]:
        op_id = f"op-{uuid.uuid4().hex[:12]}"
        with self.store.engine.begin() as conn:
            conn.execute(insert(operations).values(
                id=op_id, kind=kind, resource=resource, owner=owner,
                status=OperationStatus.RUNNING,
                server=self.server, created_at=time.time()))
        self._follow(op_id, kind, resource, work)
        return self.get(op_id)

    def _follow(self, op_id: str, kind: str, resource: str,
                work: Callable[[Emit], Awaitable[Any]]) -> None:
        self.events[op_id] = []
        self.changed[op_id] = asyncio.Event()

        def emit(event: dict[str, Any]) -> None:
            self.events[op_id].append({"at": time.time(), **event})
            self.changed[op_id].set()

        async def run() -> None:
            emit({"event": "started", "kind": kind, "resource": resource})
            try:
                result = await work(emit)
            except FlowSessionError as exc:
                self._end(op_id, OperationStatus.FAILED, error=exc.to_dict())
                emit({"event": OperationStatus.FAILED, "error": exc.to_dict()})
            except Exception as exc:  # a bug: the log has it, the caller a reason
                log.exception("operation %s (%s %s) crashed", op_id, kind, resource)
                err = {"code": "error", "message": f"unexpected failure: {type(exc).__name__}",
                       "hint": "the server log has the details"}
                self._end(op_id, OperationStatus.FAILED, error=err)
                emit({"event": OperationStatus.FAILED, "error": err})
            else:
                self._end(op_id, OperationStatus.SUCCEEDED, result=result)
                emit({"event": OperationStatus.SUCCEEDED, "result": result})
            finally:
                self.tasks.pop(op_id, None)
                asyncio.get_running_loop().call_later(KEEP_EVENTS_S, self._forget, op_id)

        self.tasks[op_id] = asyncio.get_running_loop().create_task(run())

    def _forget(self, op_id: str) -> None:
        """An ended operation's events are dropped after a while; its outcome stays."""
        self.events.pop(op_id, None)
        self.changed.pop(op_id, None)

    def _end(self, op_id: str, status: OperationStatus, *, result: Any = None,
             error: dict | None = None) -> None:
        with self.store.engine.begin() as conn:
            conn.execute(update(operations).where(operations.c.id == op_id).values(
                status=status, ended_at=time.time(),
                result=json.dumps(result, default=str) if result is not None else None,
                error=json.dumps(error) if error else None))

    def get(self, op_id: str, *, owner: str | None = None) -> dict[str, Any]:
        with self.store.engine.connect() as conn:
            r = conn.execute(select(operations).where(operations.c.id == op_id)).first()
        if r is None or (owner is not None and r.owner != owner):
            raise NotFound(f"operation {op_id} does not exist", details={"operation": op_id})
        d = dict(r._mapping)
        d.pop("server")
        d["result"] = json.loads(d["result"]) if d["result"] else None
        d["error"] = json.loads(d["error"]) if d["error"] else None
        return d

    async def stream(self, op_id: str) -> AsyncIterator[dict[str, Any]]:
        """The operation's events as they come; ends with its outcome."""
        sent = 0
        while True:
            events = self.events.get(op_id)
            if events is None:  # another server's, or from before a restart: the outcome
                op = self.get(op_id)
                yield {"event": op["status"], "result": op["result"], "error": op["error"]}
                return
            while sent < len(events):
                yield events[sent]
                sent += 1
                if events[sent - 1].get("event") in ENDED:
                    return
            changed = self.changed[op_id]
            changed.clear()
            try:
                await asyncio.wait_for(changed.wait(), timeout=15)
            except asyncio.TimeoutError:
                yield {"event": "heartbeat"}

    async def shutdown(self, timeout: float = 15.0) -> None:
        """Cancel the operations in flight (each failed, saying why), and give them up to
        ``timeout`` seconds to clean up (a start stops its half-started session)."""
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        for op_id in list(self.tasks):
            self._end(op_id, OperationStatus.FAILED, error={
                "code": "interrupted", "message": "the server stopped while this operation ran"})
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

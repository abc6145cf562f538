"""Batch runs inside the supervisor: the lines of a run spread over workers of its own, in
chunks. Stdlib only (the workers are ``flowsession.worker.batchworker``).

A run's workers are separate from the session's test workers, so ``flow test`` keeps answering
during a run, and a run can use a variant of the flow, connections and environment variables
that the test workers never see. The results are files in the run's folder (one per worker);
the supervisor keeps only counts, so a run of a million lines costs it a few messages a second.

Lines already in the folder's results files are not run again, so a run submitted again (by a
control plane that restarted) goes on where it stopped. A worker that dies mid-chunk has the
rest of its chunk run again by a new worker; the line it was running is blamed, and a line
whose worker died ``MAX_ATTEMPTS`` times is stored as failed rather than tried again.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowsession.worker import batchworker as bw
from flowsession.worker import workers as wk
from flowsession.worker.channel import Channel
from flowsession.worker.protocol import RUN_ENDED, RunState, encode, flow_file

log = logging.getLogger("flowsession.supervisor")

RUNS = "runs"  # the runs' folders, under the state dir: runs/<id>/
RUN_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}$")
AGGREGATE_FILE = "aggregate.records"  # the records an aggregate request brought
COLLECT_BYTES = 4 * 1024 * 1024  # what one collect answers at most (by default)
MAX_RECORD = 8 * 1024 * 1024  # a record past this is answered as a failed one
MAX_ATTEMPTS = 3  # a line whose worker dies this many times is stored as failed
CHUNK_SECONDS = 0.25  # a chunk's target duration: progress and balance vs. message count
MAX_CHUNK = 512
BACKSTOP_S = 30.0  # beyond chunk lines x line timeout, a silent worker is killed


@dataclass(eq=False)
class BatchWorker:
    worker: wk.Worker
    chunks: dict[int, list[int]] = field(default_factory=dict)  # sent, not done: id -> lines
    last_progress: float = 0.0  # when it last sent chunk_done (or was fed while idle)
    loaded: bool = False
    solo: bool = False  # runs suspects, one line at a time
    draining: bool = False  # asked to be retired: fed no more

    @property
    def chunk(self) -> list[int]:
        """Every line sent to it and not done."""
        return [p for c in self.chunks.values() for p in c]


class Batch:
    """One run in the supervisor. ``spawn(serve)`` forks a worker (``workers.spawn``)."""

    def __init__(self, spec: dict[str, Any], spawn: Callable[..., wk.Worker],
                 on_end: Callable[[Batch], None]):
        self.id = str(spec["id"])
        self.dir = Path(spec["dir"])
        flow = Path(spec["flow"]).resolve()
        self.flow_file = flow_file(flow)
        if self.flow_file is None:
            raise ValueError(f"no flow.dag.yaml or flow.flex.yaml in {flow}")
        self.spec = {**spec, "flow": str(flow), "flow_file": str(self.flow_file)}
        self.n_workers = max(1, int(spec.get("workers") or 1))
        # lines in flight, spread over the workers (each runs its share on threads)
        self.concurrency = max(1, int(spec.get("concurrency") or self.n_workers))
        self.n_workers = min(self.n_workers, self.concurrency)
        self.slots = math.ceil(self.concurrency / self.n_workers)
        self.line_timeout = float(spec.get("line_timeout") or 0)
        self._spawn_worker, self._on_end = spawn, on_end
        lines = (self.dir / bw.INPUTS_FILE).read_bytes().count(b"\n")
        wanted = spec.get("lines")
        positions = range(lines) if wanted is None else sorted(set(map(int, wanted)))
        stored = bw.stored_positions(self.dir)
        self.pending: deque[int] = deque(p for p in positions if p not in stored)
        self.total = len(positions)
        self.skipped = self.total - len(self.pending)  # stored before this submission
        self.done = self.failed = 0
        self.errors: list[list[Any]] = []
        self.state = RunState.LOADING
        self.error: str | None = None
        self.aggregation: bool | None = None
        self.started_at, self.ended_at = time.time(), None
        self.workers: list[BatchWorker] = []
        self.attempts: dict[int, int] = {}
        self.suspects: deque[int] = deque()  # lines in flight on a worker that died
        self.restarts = 0
        self.line_seconds: float | None = None  # moving average, for chunk sizes
        self._chunk_ids = 0
        self.usage: dict[str, int] = {}  # token counts of the lines done
        self.throttled = 0  # 429s the workers saw
        self.throttled_at: float | None = None  # when the last was reported
        self.limits: dict[int, int] = {}  # worker pid -> lines in flight it allows now
        self._throttled_by: dict[int, int] = {}  # worker pid -> 429s it reported
        self._last_limit = self.concurrency
        self.pending_aggregate: Any = None  # the aggregate request waiting for its answer
        self.agg_worker: BatchWorker | None = None
        self._answer: Callable[[Any, dict], None] | None = None

    # --- the supervisor calls these ------------------------------------------------------

    def start(self) -> None:
        if not self.pending:
            self._end(RunState.COMPLETED)
            return
        for _ in range(min(self.n_workers, len(self.pending))):
            self._spawn()

    def to_json(self) -> dict[str, Any]:
        elapsed = (self.ended_at or time.time()) - self.started_at
        return {"id": self.id, "state": self.state, "total": self.total,
                "done": self.done + self.skipped, "ran": self.done, "failed": self.failed,
                "skipped": self.skipped, "errors": self.errors, "error": self.error,
                "workers": sum(1 for b in self.workers if b.worker.alive),
                "restarts": self.restarts, "aggregation": self.aggregation,
                "concurrency": self.concurrency, "usage": dict(self.usage),
                "throttled": self.throttled, "throttled_at": self.throttled_at,
                "in_flight_limit": self._in_flight_limit(), "suspects": len(self.suspects),
                "started_at": self.started_at, "ended_at": self.ended_at,
                "lines_per_second": round(self.done / elapsed, 3) if elapsed > 0 else 0.0}

    @property
    def active(self) -> bool:
        return self.state not in RUN_ENDED or self.pending_aggregate is not None

    def owns(self, ch: Channel) -> BatchWorker | None:
        return next((b for b in self.workers if b.worker.channel is ch), None)

    def all_workers(self) -> list[wk.Worker]:
        return [b.worker for b in self.workers]

    def on_message(self, b: BatchWorker, msg: dict[str, Any]) -> None:
        event = msg.get("event")
        if event == "loaded":
            b.loaded = True
            self.aggregation = bool(msg.get("aggregation"))
            if self.state == RunState.LOADING:
                self.state = RunState.RUNNING
                log.info("run %s: %d line(s) to run on %d worker(s)", self.id,
                         len(self.pending), len(self.workers))
            self._feed(b)
        elif event == "load_failed":
            error = f"the flow failed to load: {msg.get('error')}"
            if b is self.agg_worker and self.pending_aggregate is not None:
                req, self.pending_aggregate = self.pending_aggregate, None
                self._reply(req, {"ok": True, "aggregated": False, "metrics": {},
                                  "output": {}, "error": error})
            else:
                self.error = error
                self._end(RunState.FAILED)
        elif event == "chunk_done":
            lines = b.chunks.pop(msg.get("id"), None)
            if lines is None and msg.get("id") is None and b.chunks:  # an id-less worker
                lines = b.chunks.pop(next(iter(b.chunks)))
            n = int(msg.get("done", 0))
            self._count(n, int(msg.get("failed", 0)), msg.get("errors") or [])
            if n:
                per_line = float(msg.get("busy", msg.get("seconds", 0))) / n
                self.line_seconds = (per_line if self.line_seconds is None
                                     else 0.7 * self.line_seconds + 0.3 * per_line)
            self._throttle_report(b, msg)
            b.last_progress = time.monotonic()
            if b.draining and not b.chunks:
                b.worker.retired = True
                b.worker.channel.close_after_flush()
            self._feed(b)
            self._maybe_done()
        elif event == "retire" and not b.draining:
            log.info("run %s: worker %d retires (%s)", self.id, b.worker.pid,
                     msg.get("reason"))
            b.draining = True
            if not b.chunks:
                b.worker.retired = True
                b.worker.channel.close_after_flush()
            if self.state == RunState.RUNNING and (self.pending or b.solo and self.suspects):
                self._spawn(solo=b.solo)
        elif event == "aggregated" and self.pending_aggregate is not None:
            req, self.pending_aggregate = self.pending_aggregate, None
            result = {k: v for k, v in msg.items() if k not in ("event", "ok")}
            self._reply(req, {"ok": True, **result, "aggregated": bool(msg.get("ok"))})
            b.worker.retired = True
            b.worker.channel.close_after_flush()

    def on_exit(self, b: BatchWorker, code: int | None) -> None:
        """A worker of this run exited (``code`` None: killed by a signal)."""
        chunk, b.chunks = b.chunk, {}
        if b is self.agg_worker:
            self.workers.remove(b)
            self.agg_worker = None
            if self.pending_aggregate is not None:
                req, self.pending_aggregate = self.pending_aggregate, None
                self._reply(req, {"ok": True, "metrics": {}, "output": {}, "error":
                                  f"the aggregation's worker {b.worker.exit}"})
            return
        if b.worker.retired or self.state in RUN_ENDED:
            self.workers.remove(b)
            return
        self.workers.remove(b)
        if not b.loaded:
            if self.state != RunState.FAILED:
                self.error = self.error or f"a worker {b.worker.exit} while loading the flow"
                self._end(RunState.FAILED)
            return
        self.restarts += 1
        if chunk:
            self._recover(b, chunk)
        if self.state == RunState.RUNNING:
            if self.pending and not b.solo and not b.draining:
                self._spawn()
            if self.suspects and not any(x.solo and x.worker.alive and not x.draining
                                         for x in self.workers):
                self._spawn(solo=True)
        self._maybe_done()

    def tick(self, now: float) -> None:
        """Kill a worker silent for far longer than its chunk may take (a line stuck where the
        worker's own timer cannot reach it)."""
        if self.line_timeout <= 0:
            return
        for b in self.workers:
            if b.chunks and b.worker.alive and not b.worker.retired:
                slots = 1 if b.solo else self.slots
                limit = math.ceil(len(b.chunk) / slots) * self.line_timeout + BACKSTOP_S
                if now - b.last_progress > limit:
                    log.warning("run %s: worker %d silent for %.0f s: killing it", self.id,
                                b.worker.pid, now - b.last_progress)
                    b.worker.kill()

    def cancel(self) -> None:
        if self.state in RUN_ENDED:
            return
        self.pending.clear()
        for b in self.workers:
            b.worker.retired = True
            b.worker.kill()
        self._end(RunState.CANCELED)

    def aggregate(self, req: Any, name: str, answer: Callable[[Any, dict], None]) -> None:
        """Run the aggregation nodes over ``name`` (the records the control plane collected,
        in the run's folder) on a fresh worker; ``answer(req, response)`` with the metrics."""
        self._answer, self.pending_aggregate = answer, req
        self.agg_worker = self._spawn()
        self.agg_worker.worker.channel.send({"op": "aggregate", "file": name})  # after loading

    # --- inside ----------------------------------------------------------------------------

    def _spawn(self, *, solo: bool = False) -> BatchWorker:
        spec = {**self.spec, "concurrency": 1 if solo else self.slots}
        w = self._spawn_worker(lambda sock, sup: bw.serve(sock, sup, spec))
        b = BatchWorker(w, solo=solo)
        self.workers.append(b)
        return b

    def _chunk_size(self) -> int:
        left = len(self.pending)
        fair = math.ceil(left / (2 * self.n_workers))  # the tail stays balanced
        by_time = (max(4, self.slots) if self.line_seconds is None
                   else int(CHUNK_SECONDS * self.slots / max(self.line_seconds, 1e-6)))
        return max(1, min(MAX_CHUNK, by_time, fair))

    def _feed(self, b: BatchWorker) -> None:
        """Keep a worker's threads busy (a suspects' worker: one line at a time)."""
        if (self.state != RunState.RUNNING or not b.loaded or not b.worker.alive
                or b.draining or b.worker.retired):
            return
        if b.solo:
            if not b.chunks and self.suspects:
                self._send(b, [self.suspects.popleft()])
            elif not b.chunks:  # no suspects left: it is done
                b.worker.retired = True
                b.worker.channel.close_after_flush()
            return
        while self.pending:
            # plenty left: two chunks and twice its slots queued, so its threads never wait
            # for the next chunk; near the end (or before the others have loaded): its share
            plenty = len(self.pending) > 2 * self.slots * self.n_workers
            room = (2 * self.slots if plenty else self.slots) - len(b.chunk)
            if room <= 0 and not (plenty and len(b.chunks) < 2):
                break
            n = self._chunk_size() if room <= 0 else min(room, self._chunk_size())
            self._send(b, [self.pending.popleft() for _ in range(min(n, len(self.pending)))])

    def _send(self, b: BatchWorker, lines: list[int]) -> None:
        if not b.chunks:
            b.last_progress = time.monotonic()
        self._chunk_ids += 1
        b.chunks[self._chunk_ids] = lines
        b.worker.channel.send({"op": "chunk", "id": self._chunk_ids, "lines": lines})

    def _throttle_report(self, b: BatchWorker, msg: dict[str, Any]) -> None:
        """A chunk's token usage and what its worker's gate says about rate limits."""
        usage = msg.get("usage")
        if isinstance(usage, dict):
            for k, v in usage.items():
                if isinstance(k, str) and type(v) is int:
                    self.usage[k] = self.usage.get(k, 0) + v
        throttled, limit = msg.get("throttled"), msg.get("limit")
        if type(limit) is int:
            self.limits[b.worker.pid] = limit
        if type(throttled) is int:
            new = throttled - self._throttled_by.get(b.worker.pid, 0)
            if new > 0:
                self._throttled_by[b.worker.pid] = throttled
                self.throttled += new
                self.throttled_at = time.time()
                log.info("run %s: the endpoint answered 429 (%d so far): lines in flight "
                         "lowered to %s", self.id, self.throttled, self._in_flight_limit())

    def _in_flight_limit(self) -> int:
        """The lines in flight the workers allow now (once they are gone: the last figure)."""
        live = [b for b in self.workers if b.worker.alive and not b.draining and not b.solo]
        if live:
            self._last_limit = sum(self.limits.get(b.worker.pid, self.slots) for b in live)
        return self._last_limit

    def _count(self, done: int, failed: int, errors: list) -> None:
        self.done += done
        self.failed += failed
        for e in errors:
            if len(self.errors) < 10:
                self.errors.append(e)

    def _recover(self, b: BatchWorker, chunk: list[int]) -> None:
        """Count what the dead worker stored of its lines; run the rest again. Which of them
        killed it is known only when it ran one line at a time: otherwise they all become
        suspects, run again one at a time on a worker of their own, and only a line that
        kills that worker is blamed."""
        stored = {r["i"]: r for r in bw.read_records(bw.results_file(self.dir, b.worker.pid))}
        mine = [p for p in chunk if p in stored]
        bad = [p for p in mine if not stored[p].get("ok")]
        self._count(len(mine), len(bad), [[p, stored[p].get("error")] for p in bad[:5]])
        rest = [p for p in chunk if p not in stored]
        if len(rest) > 1 and not b.solo:
            log.warning("run %s: worker %d %s with %d line(s) not done: each runs again "
                        "alone", self.id, b.worker.pid, b.worker.exit, len(rest))
            self.suspects.extend(rest)
            return
        if rest:  # it died running rest[0]
            blamed = rest[0]
            self.attempts[blamed] = self.attempts.get(blamed, 0) + 1
            log.warning("run %s: worker %d %s running line %d (attempt %d of %d)", self.id,
                        b.worker.pid, b.worker.exit, blamed, self.attempts[blamed],
                        MAX_ATTEMPTS)
            if self.attempts[blamed] >= MAX_ATTEMPTS:
                died = (b.worker.exit or "died") + (f" ({b.worker.crash})" if b.worker.crash
                                                     else "")
                message = (f"the worker running this line "
                           f"{'was ' if died.startswith('killed') else ''}{died} "
                           f"({MAX_ATTEMPTS} times): it is not tried again")
                with open(bw.results_file(self.dir, "supervisor"), "ab") as out:
                    out.write(encode({"i": blamed, "ok": False, "error": message, "d": 0}))
                self._count(1, 1, [[blamed, message]])
                rest = rest[1:]
        if b.solo:
            self.suspects.extendleft(reversed(rest))
        else:
            self.pending.extendleft(reversed(rest))

    def _maybe_done(self) -> None:
        if (self.state == RunState.RUNNING and not self.pending and not self.suspects
                and not any(b.chunks for b in self.workers)):
            self._end(RunState.COMPLETED)

    def _end(self, state: RunState) -> None:
        if self.state in RUN_ENDED:
            return
        self.state, self.ended_at = state, time.time()
        log.info("run %s %s: %d line(s) ran, %d failed%s", self.id, state, self.done,
                 self.failed, f": {self.error}" if self.error else "")
        self._close_workers()
        self._on_end(self)

    def _close_workers(self) -> None:
        """The run's workers exit when their channel closes (idle ones at once)."""
        for b in self.workers:
            if b is not self.agg_worker:
                b.worker.retired = True
                b.worker.channel.close_after_flush()

    def _reply(self, req: Any, response: dict) -> None:
        if self._answer is not None:
            self._answer(req, response)


# --- collecting: what the run's workers wrote, as data for the control plane -----------------


def collect(run_dir: Path, cursor: dict[str, Any], limit: int) -> dict[str, Any]:
    """Complete records of the results files and text of the workers' logs past ``cursor``
    (file name -> offset), about ``limit`` bytes at most. Answers ``records`` (JSON texts),
    ``logs`` (worker -> text), the new ``cursor`` and ``more``."""
    records: list[str] = []
    logs: dict[str, str] = {}
    new_cursor = {k: v for k, v in cursor.items() if isinstance(k, str) and type(v) is int}
    budget, more = max(1, limit), False
    names = sorted(p.name for p in run_dir.glob(bw.RESULTS_GLOB))
    for name in names:
        if budget <= 0:
            more = True
            break
        start = new_cursor.get(name, 0)
        got, start, budget, full = _records_from(run_dir / name, start, budget)
        records += got
        new_cursor[name] = start
        more = more or full
    log_dir = run_dir / "logs"
    for path in sorted(log_dir.glob("*.log")) if log_dir.is_dir() else []:
        key = f"logs/{path.name}"
        start = new_cursor.get(key, 0)
        f = bw.open_regular(path)
        if f is None:
            continue
        want = min(budget, 1 << 20)
        if want <= 0:
            f.close()
            more = True
            break
        with f:
            f.seek(start)
            data = f.read(want)
        more = more or len(data) == want  # perhaps more to read
        if data:
            logs[path.stem] = data.decode("utf-8", errors="replace")
            new_cursor[key] = start + len(data)
            budget -= len(data)
    return {"records": records, "logs": logs, "cursor": new_cursor, "more": more}


def _records_from(path: Path, start: int, budget: int) -> tuple[list[str], int, int, bool]:
    """(records, new offset, budget left, stopped for the budget) of one results file."""
    out: list[str] = []
    f = bw.open_regular(path)
    if f is None:
        return out, start, budget, False
    with f:
        f.seek(start)
        while True:
            raw = f.readline(MAX_RECORD + 1)
            if not raw.endswith(b"\n"):
                if len(raw) > MAX_RECORD:  # too large to answer: a failed record says so
                    out.append(_oversized(raw))
                    start += len(raw) + _skip_line(f)
                    continue
                return out, start, budget, False  # torn or empty: it waits (or never comes)
            if out and len(raw) > budget:
                return out, start, budget, True
            out.append(raw[:-1].decode("utf-8", errors="replace"))
            start += len(raw)
            budget -= len(raw)
            if budget <= 0:
                return out, start, budget, True


def _skip_line(f: Any) -> int:
    """Read past the rest of a line; how many bytes that was."""
    n = 0
    while True:
        chunk = f.readline(1 << 20)
        n += len(chunk)
        if not chunk or chunk.endswith(b"\n"):
            return n


def _oversized(head: bytes) -> str:
    m = re.match(rb'\{"i":(\d{1,12})', head)
    pos = int(m.group(1)) if m else -1
    return encode({"i": pos, "ok": False, "d": 0, "error": f"the line's record is over "
                   f"{MAX_RECORD // (1024 * 1024)} MB: its outputs are too large to store"}
                  ).decode().rstrip("\n")

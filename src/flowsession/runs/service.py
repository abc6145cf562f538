"""Batch runs: a flow over data (and/or a base run's results) on the flow's session.

The control plane prepares a run (``runs.prepare``: data loaded, column mapping resolved into
one inputs object per line, all checked before anything is stored), then hands it to the
session's supervisor, which runs the lines on workers of its own and writes their results into
the session's folder. The control plane collects those results into the run's own folder
(``RunFiles``), and when the supervisor is done it runs the aggregation nodes and writes the
outputs and metrics.

Nothing here needs the submitting process to stay: any later ``advance`` (``run show``, the
sweep, the server) picks the run up. A run whose session went away is submitted again, and
only the lines without a stored result run.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flowsession.access.connections import ConnectionService
from flowsession.backends.compute import procs
from flowsession.backends.compute.base import RunWork, SessionHandle
from flowsession.config import Settings
from flowsession.errors import Conflict, FlowSessionError, NotFound
from flowsession.flows.flowfile import FlowDefinition, load_flow
from flowsession.flows.references import connection_candidates, required_connections
from flowsession.flows.snapshot import make_snapshot
from flowsession.runs.files import RunFiles
from flowsession.runs.prepare import node_override, prepare, spec_of, start_options, variant_copy
from flowsession.runs.records import ACTIVE, ENDED, LineStatus, Run, RunRecords, RunStatus
from flowsession.runs.spec import RunSpec
from flowsession.sessions.service import SessionService
from flowsession.sessions.state import SessionState
from flowsession.store import Store
from flowsession.worker.protocol import RUN_ENDED, RunState

POLL_S = 0.25
ADVANCE_WAIT_S = 5.0  # advance_all waits this long for the runs' advances
COLLECT_ROUNDS = 16  # collects per advance (each brings at most boundary.MAX_COLLECT)
MAX_REFUSED = 10_000  # invalid records a run's sessions may send before it is stopped


class RunService:
    def __init__(self, settings: Settings, store: Store, *, sessions: SessionService,
                 connections: ConnectionService, clock: Callable[[], float] = time.time):
        self.settings, self.store, self.clock = settings, store, clock
        self.sessions, self.connections = sessions, connections
        self.backend = sessions.backend
        self.records = RunRecords(store, clock)
        self._files: dict[str, RunFiles] = {}
        self._locks: dict[str, asyncio.Lock] = {}  # one advance of a run at a time (a server)
        self._advancing: dict[str, asyncio.Task] = {}  # advance_all's tasks, by run
        self._refused: dict[str, int] = {}  # invalid records a run's sessions sent

    @classmethod
    def open(cls, settings: Settings | None = None,
             sessions: SessionService | None = None) -> RunService:
        sessions = sessions or SessionService.open(settings)
        return cls(sessions.settings, sessions.store, sessions=sessions,
                   connections=ConnectionService(sessions.settings, sessions.store))

    def files(self, name: str) -> RunFiles:
        if name not in self._files:
            self._files[name] = RunFiles(self.settings.runs_dir / name)
        return self._files[name]

    # --- creating --------------------------------------------------------------------------

    async def create(self, spec: RunSpec, *, user: str, submit: bool = True,
                     skipped: tuple[list[str], int] | None = None) -> Run:
        """Check everything, store the run's inputs, and submit it to the flow's session
        (started from ``resources`` when none runs). Returns once the run is going; with
        ``submit=False``, once it is stored (Preparing): ``advance`` submits it."""
        prepared = prepare(self, spec, user=user, skipped=skipped)  # stores nothing
        spec, flow, name, resumed = (prepared.spec, prepared.flow, prepared.name,
                                     prepared.resumed)
        self.records.create(
            name=name, owner=user, flow=str(flow.folder), spec=prepared.stored, total=0,
            display_name=spec.display_name or name, description=spec.description,
            tags=spec.tags, operator=procs.identity())
        files = self.files(name)
        try:
            # the environment first: the inputs file marks the preparation complete
            self._keep_env(name, spec.environment_variables
                           or (self._env(resumed.name) if resumed else {}))
            if resumed is not None:
                total = self._resume_files(resumed, files)
            else:
                total = files.write_inputs(prepared.lines)
            self.records.set(name, total=total)
            files.log(f"run {name} created by {user}: {total} line(s) of flow {flow.folder}"
                      + (f", resuming {resumed.name}" if resumed else ""))
            if not submit:
                return self.records.get(name)
            return await self._submit(self.records.get(name), spec=spec)
        except FlowSessionError as exc:
            self._fail(name, exc.message)
            raise
        except BaseException as exc:
            self._fail(name, f"the run could not start: {exc}")
            raise

    def _resume_files(self, old: Run, files: RunFiles) -> int:
        """The old run's inputs and its completed lines; the rest will run."""
        src = self.files(old.name).root
        files.root.mkdir(parents=True, exist_ok=True)
        for name in ("line_numbers.json", "inputs.jsonl"):  # inputs last: it marks completion
            if (src / name).exists():
                shutil.copyfile(src / name, files.root / name)
        ok = (raw for raw in self.files(old.name).raw_records() if b'"ok":true' in raw)
        files.adopt(ok)
        return files.positions()

    # --- the secret part of a run: environment variables, kept encrypted ------------------

    def _keep_env(self, name: str, env: dict[str, str]) -> None:
        if not env:
            return
        from flowsession.access.secrets import cipher

        token = cipher(self.settings).encrypt(json.dumps(env).encode())
        path = self.files(name).root / "env.enc"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(token)
        path.chmod(0o600)

    def _env(self, name: str) -> dict[str, str]:
        path = self.files(name).root / "env.enc"
        if not path.exists():
            return {}
        from flowsession.access.secrets import cipher

        return json.loads(cipher(self.settings).decrypt(path.read_bytes()))

    # --- submitting ------------------------------------------------------------------------

    async def _submit(self, run: Run, *, spec: RunSpec | None = None) -> Run:
        """Send the run (its lines without a stored result) to the flow's session."""
        spec = spec or spec_of(run)
        files = self.files(run.name)
        await self._collect(run, None)  # results a lost session left
        session = await self.sessions.ready(run.flow, user=run.owner,
                                            options=start_options(spec))
        handle = session.session_handle
        compute = self.sessions.computes.get(session.compute_id, user=run.owner)
        workers = spec.workers or max(1, math.ceil(compute.vcpu))
        concurrency = spec.concurrency(self._env(run.name))
        stored = files.stored()
        todo = [p for p in range(run.total) if p not in stored]
        work = self._work(run, spec, session.flow, session.identity, workers=workers,
                          lines=tuple(todo), concurrency=concurrency)
        status = await self.backend.submit_run(handle, work)
        first = run.started_at is None
        if not self.records.transition(run.name, RunStatus.RUNNING, session_id=session.id,
                                       started_at=run.started_at or self.clock()):
            await self.backend.cancel_run(handle, run.name)  # canceled meanwhile
            return await self._advance(run.name)
        files.log(f"{'submitted' if first else 'resubmitted'} to session {session.id}: "
                  f"{len(todo)} line(s) to run on {workers} worker(s), "
                  f"{concurrency} in flight"
                  + ("" if first else f", {len(stored)} already stored"))
        if status.get("state") == RunState.FAILED:
            return await self._advance(run.name)
        return self.records.get(run.name)

    def _work(self, run: Run, spec: RunSpec, flow: str, identity: str | None = None, *,
              workers: int = 1, lines: tuple[int, ...] | None = None,
              concurrency: int | None = None) -> RunWork:
        """The run as its session gets it: the lines as data, the secrets only in memory
        (never stored)."""
        flow_def = load_flow(flow)
        variant = run.spec.get("variant_node")
        flow_path = None
        if variant:
            flow_path = self._variant_snapshot(run, flow_def, variant)
        overrides = node_override(flow_def, spec)
        needed = (required_connections(flow_def, overrides)
                  | connection_candidates(flow_def, overrides, spec.init)) & \
            self.connections.usable_names(run.owner, identity=identity)
        return RunWork(
            run_id=run.name, inputs=self.files(run.name).inputs_path.read_bytes(),
            lines=lines, workers=workers, concurrency=concurrency,
            line_timeout=spec.line_timeout if spec.line_timeout is not None else 600.0,
            flow=str(flow_path) if flow_path else None, env=self._env(run.name),
            init=dict(spec.init or {}), node_override=overrides,
            connections=self.connections.for_executor_as(needed, owner=run.owner,
                                                         identity=identity))

    def _variant_snapshot(self, run: Run, flow: FlowDefinition, variant: str) -> Path:
        """The flow with the run's variant made the default, as a snapshot."""
        work = self.files(run.name).root / "variant"
        variant_copy(flow, variant, work)
        try:
            return make_snapshot(load_flow(work), self.settings.snapshots_dir).path
        finally:
            shutil.rmtree(work, ignore_errors=True)

    async def _collect(self, run: Run, handle: SessionHandle | None) -> int:
        """Bring the run's new records and worker logs over from its session (or from
        what was kept of a session that ended); how many records were new."""
        files, new = self.files(run.name), 0
        for _ in range(COLLECT_ROUNDS):
            got = await self.backend.collect(handle, run.name, files.cursor(),
                                             total=run.total)
            new += files.store(got)
            if got.refused:
                self._refused[run.name] = self._refused.get(run.name, 0) + got.refused
                files.log(f"{got.refused} record(s) from the session were not valid and "
                          "were left out")
            if not got.more:
                break
        return new

    # --- following a run -------------------------------------------------------------------

    async def advance(self, name: str, *, user: str | None = None) -> Run:
        """Bring the run's record up to date: collect new results, resubmit a run whose
        session went away, finish a run whose lines are all done."""
        run = self.records.get(name, owner=user)
        if run.status in ENDED:
            return run
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            run = await self._advance(name)
        if run.status in ENDED:
            self._locks.pop(name, None)  # a server lives long: no lock per ended run
            self._refused.pop(name, None)
        return run

    async def _advance(self, name: str) -> Run:
        run = self.records.get(name)
        if run.status in ENDED:
            return run
        files = self.files(name)
        if run.status == RunStatus.PREPARING:
            if procs.identity_alive(run.operator) and run.operator != procs.identity():
                return run  # its creator is still preparing it
            if not files.has_inputs() or run.total == 0 and not files.has_inputs():
                return self._fail(name, "the control plane stopped while preparing the run")
            if run.total == 0:  # it stopped before recording the number of lines
                self.records.set(name, total=files.positions())
                run = self.records.get(name)
            try:
                return await self._submit(run)
            except FlowSessionError as exc:  # e.g. its session cannot start: say so, once
                self._fail(name, f"the run could not start: {exc.message}")
                raise
        handle = self._handle(run)
        status = await self.backend.run_status(handle, name) if handle else None
        await self._collect(run, handle)
        run = self._update_counts(run)
        if self._refused.get(name, 0) > MAX_REFUSED:  # a session sending junk: cut it off
            if handle is not None:
                await self.backend.cancel_run(handle, name)
            return await self._finish(run, RunStatus.FAILED, error=(
                f"the session sent more than {MAX_REFUSED} records that are not valid data: "
                "the run was stopped (its flow code writes into the run's folder?)"))
        if run.status == RunStatus.CANCELING:
            if status is None or status.get("state") in RUN_ENDED:
                return await self._finish(run, RunStatus.CANCELED)
            return run
        if status is None:  # the session is gone or restarted: go on where it stopped
            if run.completed + run.failed >= run.total:
                return await self._finish(run, RunStatus.COMPLETED)
            files.log("the session running this run went away: resubmitting the lines "
                      "without a stored result")
            try:
                await self._replace_lost_session(run)
                return await self._submit(run)
            except FlowSessionError as exc:
                return self._fail(name, f"the run could not be resubmitted: {exc.message}")
        self._note_throttle(run, status)
        state = status.get("state")
        if state == RunState.FAILED:
            return await self._finish(run, RunStatus.FAILED, error=status.get("error"))
        if state == RunState.CANCELED:
            return await self._finish(run, RunStatus.CANCELED)
        if state == RunState.COMPLETED:
            if run.completed + run.failed < run.total:  # resubmitted lines still to go
                return await self._submit(run)
            return await self._finish(run, RunStatus.COMPLETED)
        return run

    def _note_throttle(self, run: Run, status: dict[str, Any]) -> None:
        """Keep what the session says of the endpoint's 429s (``run show`` tells it)."""
        if not status.get("throttled"):
            return
        info = {"throttled": status["throttled"], "at": status.get("throttled_at"),
                "in_flight_limit": status.get("in_flight_limit"),
                "concurrency": status.get("concurrency")}
        files = self.files(run.name)
        before = files.throttle() or {}
        if before.get("throttled") != info["throttled"] or \
                before.get("in_flight_limit") != info["in_flight_limit"]:
            if not before:
                files.log(f"the endpoint answers 429 (rate limited): lines in flight lowered "
                          f"from {info['concurrency']} to {info['in_flight_limit']}")
            files.write_throttle(info)

    def system(self, run: Run) -> dict[str, Any]:
        """pf's system metrics (token counts summed over the stored lines, duration) and the
        session's word on rate limits, for ``run show``."""
        files = self.files(run.name)
        return {"system_metrics": {**files.usage(), "duration": run.duration},
                "throttle": files.throttle()}

    async def _replace_lost_session(self, run: Run) -> None:
        """The flow's session stopped answering. Its record may still say RUNNING (a killed
        supervisor): let the sessions service see what really runs, and reset a session whose
        supervisor is gone, so that the run goes on on a new one."""
        session = self.sessions.records.bound_to(run.flow)
        if session is None or session.owner != run.owner:
            return
        await self.sessions.sweeper.reconcile_one(session)
        session = self.sessions.records.get(session.id)
        handle = session.session_handle if session.handle else None
        if session.state == SessionState.FAILED and (
                handle is None or not self.backend.alive(handle)):
            self.files(run.name).log(f"session {session.id} was lost ({session.reason}): "
                                     "resetting it")
            await self.sessions.reset(run.flow, user=run.owner,
                                      reason=f"run {run.name} needs it: {session.reason}")

    def _handle(self, run: Run) -> SessionHandle | None:
        """The supervisor of the session the run was sent to, while it has one."""
        if not run.session_id:
            return None
        try:
            session = self.sessions.records.get(run.session_id)
        except NotFound:
            return None
        return session.session_handle if session.handle else None

    def _update_counts(self, run: Run) -> Run:
        ok, failed, errors = self.files(run.name).counts()
        if (ok, failed, errors) != (run.completed, run.failed, run.errors):
            self.records.set(run.name, completed=ok, failed=failed, errors=errors)
            run = self.records.get(run.name)
        return run

    async def _finish(self, run: Run, status: RunStatus, *, error: str | None = None) -> Run:
        """End the run: one process at a time; the others leave it to that one."""
        with self.files(run.name).finishing() as mine:
            current = self.records.get(run.name)
            if not mine or current.status in ENDED:
                return current
            return await self._finish_now(current, status, error=error)

    async def _finish_now(self, run: Run, status: RunStatus, *, error: str | None = None) -> Run:
        files = self.files(run.name)
        handle = self._handle(run)
        await self._collect(run, handle)
        run = self._update_counts(run)
        files.write_outputs()
        if status == RunStatus.COMPLETED and run.completed:
            try:
                agg = await self._aggregate(run)
            except FlowSessionError as exc:
                agg = {"aggregated": False, "error": exc.message, "metrics": {}}
            if agg.get("metrics"):
                files.write_metrics(agg["metrics"])
            if agg.get("error"):
                status, error = RunStatus.FAILED, f"the aggregation failed: {agg['error']}"
        files.log(f"run {status.lower()}: {run.summary()}" + (f"; {error}" if error else ""))
        self.records.transition(run.name, status, error=error, ended_at=self.clock())
        await self.backend.forget_run(self._handle(run), run.name)
        return self.records.get(run.name)

    async def _aggregate(self, run: Run) -> dict[str, Any]:
        """The aggregation nodes (a flex class's ``__aggregate__``) over every completed
        line, on the flow's session."""
        flow = load_flow(run.flow)
        raw = list(self.files(run.name).raw_records())
        if flow.kind == "dag":
            if not any(n.get("aggregation") for n in flow.nodes):
                return {}
        elif not any(b'"agg":' in r for r in raw):  # a flex class with __aggregate__ keeps
            return {}                                # each line's output for it
        spec = spec_of(run)
        session = await self.sessions.ready(run.flow, user=run.owner,
                                            options=start_options(spec))
        records = b"".join(r + b"\n" for r in raw)
        work = self._work(run, spec, session.flow, session.identity)
        return await self.backend.aggregate_run(session.session_handle, work, records)

    def _fail(self, name: str, error: str) -> Run:
        self.records.transition(name, RunStatus.FAILED, error=error, ended_at=self.clock())
        self.files(name).log(f"run failed: {error}")
        return self.records.get(name)

    async def wait(self, name: str, *, user: str,
                   on_progress: Callable[[Run], None] | None = None,
                   timeout: float | None = None) -> Run:
        """Advance the run until it ends, calling ``on_progress`` on every step."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            run = await self.advance(name, user=user)
            if on_progress is not None:
                on_progress(run)
            if run.status in ENDED:
                return run
            if deadline is not None and time.monotonic() > deadline:
                return run
            await asyncio.sleep(run.look_again_s(POLL_S))

    async def cancel(self, name: str, *, user: str) -> Run:
        run = self.records.get(name, owner=user)
        if run.status in ENDED:
            raise Conflict(f"run {name} is {run.status}: there is nothing to cancel",
                           details={"status": run.status})
        if run.status == RunStatus.PREPARING and self.records.transition(
                name, RunStatus.CANCELED, expect={RunStatus.PREPARING}, ended_at=self.clock()):
            return self.records.get(name)
        self.records.transition(name, RunStatus.CANCELING)  # (a second cancel: it is already)
        self.files(name).log(f"cancel requested by {user}")
        handle = self._handle(run)
        if handle is not None:
            await self.backend.cancel_run(handle, name)
        return await self.advance(name)

    async def advance_all(self, *, wait_s: float = ADVANCE_WAIT_S) -> None:
        """For the sweep: every active run moves on, each in a task of its own, so a session
        slow to answer holds up its own runs only (errors are the run's, not the sweep's).
        Waits up to ``wait_s`` for them; a run still advancing is not started twice."""
        async def quietly(name: str) -> None:
            try:
                await self.advance(name)
            except FlowSessionError:
                pass
            finally:
                self._advancing.pop(name, None)

        for run in self.records.list(owner=None, statuses=ACTIVE):
            if run.name not in self._advancing:
                self._advancing[run.name] = asyncio.create_task(quietly(run.name))
        if self._advancing:
            await asyncio.wait(list(self._advancing.values()), timeout=wait_s)

    # --- reading ---------------------------------------------------------------------------

    def get(self, name: str, *, user: str) -> Run:
        return self.records.get(name, owner=user)

    def list(self, *, user: str, limit: int | None = None) -> list[Run]:
        return self.records.list(owner=user, limit=limit)

    def details(self, name: str, *, user: str) -> list[dict[str, Any]]:
        """Per line: its number, inputs, outputs (or error), status and duration."""
        run = self.records.get(name, owner=user)
        files = self.files(run.name)
        records = files.records()
        rows = []
        for pos, inputs in enumerate(files.iter_inputs()):
            rec = records.get(pos)
            status = LineStatus.NOT_STARTED if rec is None else (
                LineStatus.COMPLETED if rec.get("ok") else LineStatus.FAILED)
            rows.append({"line_number": files.line_number(pos), "status": status,
                         "inputs": inputs, "outputs": (rec or {}).get("output"),
                         "error": (rec or {}).get("error"), "duration": (rec or {}).get("d"),
                         "system_metrics": (rec or {}).get("u") or {}})
        return rows

    def metrics(self, name: str, *, user: str) -> dict[str, Any]:
        run = self.records.get(name, owner=user)
        return self.files(run.name).metrics()

    def outputs(self, name: str, *, user: str) -> list[dict[str, Any]]:
        run = self.records.get(name, owner=user)
        return self.files(run.name).outputs()

    def log_files(self, name: str, *, user: str) -> list[Path]:
        run = self.records.get(name, owner=user)
        return self.files(run.name).log_files()


"""The supervisor's batch-run ops (``run``, ``run_status``, ``run_cancel``, ``collect``,
``run_forget``, ``aggregate``): a mixin of ``flowsession.worker.session.Supervisor``, whose
phase, workers and selector they use. The runs themselves are ``flowsession.worker.batch``.
A run's folder (``<state dir>/runs/<id>/``) is the session's own; whatever the flow's code
left there is replaced, never followed. Stdlib only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flowsession.worker import batch as bt
from flowsession.worker import workers as wk
from flowsession.worker.channel import Channel
from flowsession.worker.loop import BadRequest, Request, number
from flowsession.worker.protocol import (
    E_SESSION_FAILED,
    E_WRONG_PHASE,
    MAX_CONCURRENCY,
    Phase,
    error,
    write_json,
)


class RunOps:
    """Needs, from the supervisor: ``phase``, ``error``, ``flow``, ``n_workers``,
    ``line_timeout``, ``state_dir``, ``batches``, ``sel``, ``answer``,
    ``_on_worker_message``, ``_on_worker_closed``, ``close_in_child``, ``last_activity``."""

    def _op_run(self, req: Request) -> None:
        """Start a run (answers at once with its status); a run already going answers its
        status; a run submitted again goes on where its folder's results stop."""
        if self.phase != Phase.READY:
            kind = E_SESSION_FAILED if self.phase == Phase.FAILED else E_WRONG_PHASE
            self.answer(req, error(kind, f"only a ready session runs lines; this one is "
                                   f"{self.phase}" + (f": {self.error}" if self.error else "")))
            return
        spec = self._run_spec(req.msg)
        batch = self.batches.get(spec["id"])
        if batch is None or not batch.active:
            try:
                self._keep_inputs(spec, req.msg.get("inputs"))
                batch = bt.Batch(spec, self._spawn_batch_worker, self._batch_ended)
            except (OSError, ValueError) as exc:
                raise BadRequest(f"the run cannot start: {exc}") from None
            self.batches[batch.id] = batch
            batch.start()
        self.answer(req, {"ok": True, "run": batch.to_json()})

    def _run_spec(self, msg: dict[str, Any]) -> dict[str, Any]:
        """A run's settings; its folder is ours (``runs/<id>`` in the state dir)."""
        run_id = msg.get("id")
        if not isinstance(run_id, str) or not bt.RUN_ID.match(run_id):
            raise BadRequest("'id' must be a run name (letters, digits, '_', '-', '.')")
        for key in ("env", "connections", "init", "node_override"):
            if not isinstance(msg.get(key) or {}, dict):
                raise BadRequest(f"'{key}' must be an object")
        lines = msg.get("lines")
        if lines is not None and not (isinstance(lines, list)
                                      and all(isinstance(i, int) for i in lines)):
            raise BadRequest("'lines' must be a list of line positions")
        concurrency = int(number(msg, "concurrency", 0))
        if not 0 <= concurrency <= MAX_CONCURRENCY:
            raise BadRequest(f"'concurrency' must be 1 to {MAX_CONCURRENCY} lines in flight")
        run_dir = self.state_dir / bt.RUNS / run_id
        return {**msg, "dir": str(run_dir), "flow": msg.get("flow") or self.flow,
                "workers": int(number(msg, "workers", self.n_workers)),
                "concurrency": concurrency,
                "line_timeout": number(msg, "line_timeout", self.line_timeout)}

    @staticmethod
    def _keep_inputs(spec: dict[str, Any], inputs: Any) -> None:
        """The run's lines (``inputs``: one JSON object per line) into its folder."""
        run_dir = Path(spec["dir"])
        run_dir.mkdir(parents=True, exist_ok=True)
        if inputs is None:
            if not (run_dir / bt.bw.INPUTS_FILE).is_file():
                raise ValueError("no 'inputs' were sent and none are stored for this run")
            return
        if not isinstance(inputs, str):
            raise ValueError("'inputs' must be the lines' JSON objects, one per line")
        _write_new(run_dir / bt.bw.INPUTS_FILE, inputs)

    def _op_run_status(self, req: Request) -> None:
        batch = self.batches.get(str(req.msg.get("id")))
        self.answer(req, {"ok": True, "run": batch.to_json() if batch else None})

    def _op_run_cancel(self, req: Request) -> None:
        batch = self.batches.get(str(req.msg.get("id")))
        if batch is not None:
            batch.cancel()
        self.answer(req, {"ok": True, "run": batch.to_json() if batch else None})

    def _op_collect(self, req: Request) -> None:
        """The records and log text a run's workers wrote past ``cursor``, at most
        ``max_bytes`` of them (``more`` says there is more)."""
        spec = self._run_spec({"id": req.msg.get("id")})
        cursor = req.msg.get("cursor") or {}
        if not isinstance(cursor, dict):
            raise BadRequest("'cursor' must be an object")
        limit = int(number(req.msg, "max_bytes", bt.COLLECT_BYTES))
        self.answer(req, {"ok": True, **bt.collect(Path(spec["dir"]), cursor, limit)})

    def _op_run_forget(self, req: Request) -> None:
        """Remove an ended run's folder (its results were collected)."""
        spec = self._run_spec({"id": req.msg.get("id")})
        batch = self.batches.get(spec["id"])
        if batch is not None and batch.active:
            self.answer(req, error(E_WRONG_PHASE, f"run {batch.id} is still {batch.state}"))
            return
        self.batches.pop(spec["id"], None)
        shutil.rmtree(spec["dir"], ignore_errors=True)
        self.answer(req, {"ok": True})

    def _op_aggregate(self, req: Request) -> None:
        """The aggregation nodes over ``records`` (the run's completed lines, as the control
        plane stored them), on a worker loaded like the run's; answers with the metrics."""
        if self.phase != Phase.READY:
            self.answer(req, error(E_WRONG_PHASE, f"only a ready session aggregates; this one "
                                   f"is {self.phase}"))
            return
        spec = self._run_spec(req.msg)
        records = req.msg.get("records")
        if not isinstance(records, str):
            raise BadRequest("'records' must be the run's records, one JSON object per line")
        batch = self.batches.get(spec["id"])
        if batch is not None and batch.active:
            self.answer(req, error(E_WRONG_PHASE, f"run {batch.id} is still {batch.state}"))
            return
        try:
            self._keep_inputs(spec, req.msg.get("inputs"))
            _write_new(Path(spec["dir"]) / bt.AGGREGATE_FILE, records)
            batch = bt.Batch({**spec, "lines": []}, self._spawn_batch_worker, self._batch_ended)
        except (OSError, ValueError) as exc:
            raise BadRequest(f"the aggregation cannot start: {exc}") from None
        self.batches[batch.id] = batch
        batch.start()
        batch.aggregate(req, bt.AGGREGATE_FILE, self.answer)

    def _spawn_batch_worker(self, serve: Callable[..., int]) -> wk.Worker:
        w = wk.spawn(None, None, self.sel, self._on_worker_message, self._on_worker_closed,
                     self.close_in_child, serve=serve)
        return w

    def _batch_ended(self, batch: bt.Batch) -> None:
        self.last_activity = time.monotonic()
        write_json(batch.dir / "status.json", batch.to_json())

    def _batch_of(self, ch: Channel) -> tuple[bt.Batch, bt.BatchWorker] | None:
        for batch in self.batches.values():
            b = batch.owns(ch)
            if b is not None:
                return batch, b
        return None


def _write_new(path: Path, text: str) -> None:
    """Replace ``path`` with a new file holding ``text`` (whatever the flow's code left there
    -- a symlink, a FIFO -- is removed, never followed)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)

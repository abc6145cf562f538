"""A batch run's worker. Stdlib and promptflow only.

Forked from the supervisor like the test workers (so promptflow is already imported), it loads
the run's flow -- the session's folder, or a copy with a variant chosen -- with the run's
connections, environment variables, node overrides and init arguments, then runs chunks of
lines. Each line's result is one JSON record appended, with a single ``write``, to the worker's
own file ``<run dir>/results.<pid>.jsonl``: a killed worker leaves at most a torn last line,
which every reader ignores (it has no newline).

It runs up to ``concurrency`` lines at once, on threads (lines of LLM flows mostly wait on
their endpoint: measured against ``exec_line_async`` on one event loop, threads ran 640 lines
of a 100 ms node at 64 in flight in 1.28 s vs 1.82 s, and the echo flow's CPU-bound lines no
slower than one at a time). A gate (``flowsession.worker.throttle``) lowers the lines in
flight when the endpoint answers 429 and raises them again as lines succeed.

Supervisor -> worker::

    {"op": "chunk", "id": n, "lines": [position, ...]}   (several chunks may be queued)
    {"op": "aggregate", "file": NAME}   # the aggregation nodes over NAME's records (in the run dir)

Worker -> supervisor::

    {"event": "loaded", "aggregation": bool} | {"event": "load_failed", "error": str}
    {"event": "chunk_done", "id": n, "done": n, "failed": k, "errors": [[position, message],
     ...], "seconds": s, "busy": s (the lines' durations, summed), "usage": {token counts},
     "throttled": n (429s seen by this worker), "limit": n (lines in flight allowed now),
     "lowest": n}
    {"event": "retire", "reason": str}   (a line timed out: its thread may be stuck in it)
    {"event": "aggregated", "ok": bool, "metrics": {...}, "output": {...}, "error": str | null}

A record::

    {"i": position, "ok": true, "output": {...}, "agg": {...} (flows with aggregation), "d": s,
     "u": {"prompt_tokens": n, "completion_tokens": n, "total_tokens": n} (when counted)}
    {"i": position, "ok": false, "error": str, "d": s}

``<run dir>/inputs.jsonl`` holds one JSON object of inputs per line; a line's position is its
line number in that file (0-based). A line over the run's line timeout gets a failed record
("timed out") and its slot is given to the next line; the other lines in flight go on. A
thread cannot be stopped, so the worker asks to be retired: the supervisor feeds it no more
and replaces it, and its process (with whatever the line left running) ends once its other
lines have ended.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Any

from flowsession.worker import throttle
from flowsession.worker.protocol import encode
from flowsession.worker.flowenv import apply_flow_environment
from flowsession.worker.outputs import describe, flow_outputs, media_encoder, plain
from flowsession.worker.pfcost import lighten_batch_lines, quiet_node_logs
from flowsession.worker.workers import message_of, prepare_child

log = logging.getLogger("flowsession.worker")

FLEX_AGG = "output"  # a flex flow's record keeps the line's output for __aggregate__
TIMEOUT_EXIT = 75  # a worker's exit code after a line ran over its timeout
INPUTS_FILE = "inputs.jsonl"
RESULTS_GLOB = "results.*.jsonl"


def results_file(run_dir: Path, owner: int | str) -> Path:
    return run_dir / f"results.{owner}.jsonl"


def open_regular(path: Path) -> Any:
    """``path`` opened for reading if it is a regular file, else None: flow code can plant
    anything in the run's folder, and a FIFO must not hang the session, nor a symlink lead
    it elsewhere."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return os.fdopen(fd, "rb")
    except OSError:
        pass
    os.close(fd)
    return None


def read_records(path: Path) -> list[dict[str, Any]]:
    """The complete records of one results file (a torn last line is ignored)."""
    f = open_regular(path)
    if f is None:
        return []
    with f:
        data = f.read()
    out = []
    for raw in data.split(b"\n")[:-1]:  # the last piece has no newline: torn or empty
        try:
            rec = json.loads(raw)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("i"), int):
            out.append(rec)
    return out


def stored_positions(run_dir: Path) -> set[int]:
    """Positions with a record in any results file of the run's folder."""
    done: set[int] = set()
    for path in run_dir.glob(RESULTS_GLOB):
        done.update(rec["i"] for rec in read_records(path))
    return done


class _Runner:
    def __init__(self, sock: socket.socket, spec: dict[str, Any]):
        self.sock = sock
        self.spec = spec
        self.run_id = str(spec["id"])
        self.dir = Path(spec["dir"])
        self.timeout = float(spec.get("line_timeout") or 0)
        self.out = os.open(results_file(self.dir, os.getpid()),
                           os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._lines: list[bytes] | None = None
        self.gate = throttle.Gate(int(spec.get("concurrency") or 1))
        self.queue: queue.SimpleQueue[tuple[_Chunk, int]] = queue.SimpleQueue()
        self.lock = threading.Lock()  # inflight, the chunks' counts, the results file
        self.inflight: dict[int, tuple[float, _Chunk]] = {}  # position -> (started, chunk)
        self.runners = 0
        self.retiring = False
        self.local = threading.local()  # the line's executor result (its token usage)
        self._send_lock = threading.Lock()

    def send(self, obj: dict[str, Any]) -> None:
        data = encode(obj)
        with self._send_lock:
            self.sock.sendall(data)

    def load(self) -> bool:
        from promptflow.executor import FlowExecutor

        apply_flow_environment(Path(self.spec["flow_file"]), self.spec.get("connections") or {})
        os.environ.update({str(k): str(v) for k, v in (self.spec.get("env") or {}).items()})
        flow_dir = Path(self.spec["flow"])
        if "PF_DISABLE_TRACING" not in (self.spec.get("env") or {}) and calls_llms(flow_dir):
            os.environ["PF_DISABLE_TRACING"] = "false"  # promptflow counts tokens in traces
        lighten_batch_lines()  # promptflow's per-line costs that change nothing (pfcost.py)
        quiet_node_logs(os.environ)  # no five INFO lines a line (the run or flow may ask)
        started = time.monotonic()
        try:
            self.executor = FlowExecutor.create(
                Path(self.spec["flow_file"]), dict(self.spec.get("connections") or {}),
                working_dir=flow_dir, raise_ex=False,
                node_override=self.spec.get("node_override") or None,
                init_kwargs=self.spec.get("init") or None)
        except Exception as exc:  # noqa: BLE001 - the flow's code, yaml, init, connections
            log.exception("run %s: the flow failed to load", self.run_id)
            self.send({"event": "load_failed", "error": message_of(exc)})
            return False
        flow = getattr(self.executor, "_flow", None)
        self.aggregation = bool(getattr(self.executor, "has_aggregation_node", False))
        self.flex = any(c.__name__ == "ScriptExecutor" for c in type(self.executor).__mro__)
        self.declared = set(getattr(flow, "outputs", None) or ())
        self.media = media_encoder(Path(self.spec["flow_file"]), flow_dir)
        log.info("run %s: worker %d loaded %s in %.3f s", self.run_id, os.getpid(), flow_dir,
                 time.monotonic() - started)
        throttle.watch_http(self.gate)
        self._keep_results()
        self.send({"event": "loaded", "aggregation": self.aggregation})
        return True

    def _keep_results(self) -> None:
        """Each thread's last line result (its token usage is read from it)."""
        exec_line, local = self.executor.exec_line, self.local

        def keeping(*args: Any, **kwargs: Any) -> Any:
            local.result = exec_line(*args, **kwargs)
            return local.result

        self.executor.exec_line = keeping

    def lines(self) -> list[bytes]:
        if self._lines is None:
            self._lines = (self.dir / INPUTS_FILE).read_bytes().split(b"\n")
        return self._lines

    def serve(self) -> int:
        if not self.load():
            return 1
        threading.Thread(target=self._watch, daemon=True, name="line-timeouts").start()
        for raw in self.sock.makefile("rb"):
            try:
                msg = json.loads(raw)
            except ValueError:
                continue
            if msg.get("op") == "chunk":
                self.chunk(msg.get("lines") or [], msg.get("id"))
            elif msg.get("op") == "aggregate":
                self.send({"event": "aggregated", **self.aggregate(str(msg.get("file")))})
        return 0  # the supervisor closed the channel: the run is over

    def chunk(self, positions: list[int], chunk_id: Any = None) -> None:
        """Queue a chunk's lines for the runner threads; ``chunk_done`` when all have ended."""
        c = _Chunk(chunk_id, len(positions))
        if not positions:
            self._chunk_done(c)
            return
        for pos in positions:
            self.queue.put((c, pos))
        with self.lock:
            want = min(self.gate.slots, self.queue.qsize() + self.gate.inflight)
            while self.runners < want:
                self.runners += 1
                threading.Thread(target=self._runner, daemon=True).start()

    def _runner(self) -> None:
        while True:
            c, pos = self.queue.get()
            self.gate.enter()
            started = time.monotonic()
            with self.lock:
                self.inflight[pos] = (started, c)
            self.local.result = None
            record = self._execute(pos)
            usage = _usage(self.local.result)
            if usage:
                record["u"] = usage
            with self.lock:
                if self.inflight.pop(pos, None) is None:  # timed out: its record is written
                    return  # this thread was replaced; it ends here
                record["d"] = round(time.monotonic() - started, 6)
                self._write(record)
                self._ended(c, record)
            self.gate.leave(ok=record["ok"])

    def _ended(self, c: _Chunk, record: dict[str, Any]) -> None:
        """(with the lock) one line of chunk ``c`` has its record."""
        c.left -= 1
        c.busy += record.get("d", 0)
        if not record["ok"]:
            c.failed += 1
            if len(c.errors) < 5:
                c.errors.append([record["i"], record["error"]])
        for k, v in (record.get("u") or {}).items():
            c.usage[k] = c.usage.get(k, 0) + v
        if c.left <= 0:
            self._chunk_done(c)

    def _chunk_done(self, c: _Chunk) -> None:
        self.send({"event": "chunk_done", "id": c.id, "done": c.n, "failed": c.failed,
                   "errors": c.errors, "seconds": round(time.monotonic() - c.started, 6),
                   "busy": round(c.busy, 6), "usage": c.usage, **self.gate.report()})

    def _watch(self) -> None:
        """Fail the lines past the line timeout; the others go on. A thread stuck in a
        timed-out line cannot be stopped: a new runner takes its place, and the worker asks
        to be retired (the supervisor replaces it once its lines have ended)."""
        while True:
            time.sleep(0.05 if 0 < self.timeout < 2 else 0.2)
            if self.timeout <= 0:
                continue
            now = time.monotonic()
            with self.lock:
                late = [(pos, st, c) for pos, (st, c) in self.inflight.items()
                        if now - st > self.timeout]
                for pos, st, c in late:
                    del self.inflight[pos]
                    log.warning("run %s: line %d ran over its timeout of %g s", self.run_id,
                                pos, self.timeout)
                    why = (f" (the endpoint answered 429, rate limited, "
                           f"{self.gate.throttled} time(s) in this worker)"
                           if self.gate.throttled else "")
                    record = {"i": pos, "ok": False, "d": round(now - st, 6),
                              "error": f"the line timed out: it ran over the run's line "
                                       f"timeout of {self.timeout:g} s{why}"}
                    self._write(record)
                    self._ended(c, record)
                    threading.Thread(target=self._runner, daemon=True).start()
            for _ in late:
                self.gate.leave(ok=False)
            if late and not self.retiring:
                self.retiring = True
                self.send({"event": "retire", "reason": "a line timed out"})

    def _execute(self, pos: int) -> dict[str, Any]:
        try:
            inputs = json.loads(self.lines()[pos])
        except (IndexError, ValueError) as exc:
            return {"i": pos, "ok": False, "error": f"no inputs for line {pos}: {exc}"}
        try:
            result = self.executor.exec_line(inputs, index=pos, run_id=self.run_id)
            run_info = result.run_info
            status = str(getattr(run_info.status, "value", run_info.status))
            if status != "Completed":
                err = run_info.error or {}
                return {"i": pos, "ok": False,
                        "error": err.get("message") or f"the line ended with status {status}"}
            record: dict[str, Any] = {"i": pos, "ok": True, "output": flow_outputs(
                result.output, pos, self.declared, self.media)}
            if self.aggregation and self.flex:  # its __aggregate__ gets the lines' outputs
                record["agg"] = {FLEX_AGG: plain(result.output)}
            elif self.aggregation:
                record["agg"] = {k: plain(v)
                                 for k, v in (result.aggregation_inputs or {}).items()}
            return record
        except BaseException as exc:  # noqa: BLE001 - whatever the flow returns or raises
            log.warning("run %s: line %d failed", self.run_id, pos, exc_info=True)
            return {"i": pos, "ok": False, "error": describe(exc)}

    def _write(self, record: dict[str, Any]) -> None:
        try:
            data = encode(record)
        except Exception as exc:  # noqa: BLE001 - a circular output, a __str__ that raises
            data = encode({"i": record["i"], "ok": False, "d": record.get("d", 0),
                           "error": f"the line's output cannot be stored: {describe(exc)}"})
        os.write(self.out, data)

    def aggregate(self, name: str) -> dict[str, Any]:
        """Run the aggregation nodes over the completed lines of ``name`` (records in
        position order, as the control plane collected them)."""
        if not self.aggregation:
            return {"ok": True, "metrics": {}, "output": {}, "error": None}
        try:
            records = [r for r in read_records(self.dir / name) if r.get("ok")]
            records.sort(key=lambda r: r["i"])
            lines = self.lines()
            line_inputs = [json.loads(lines[r["i"]]) for r in records]
            line_aggs = [r.get("agg") or {} for r in records]
            inputs = {k: [d.get(k) for d in line_inputs] for k in _keys(line_inputs)}
            agg: Any = {k: [d.get(k) for d in line_aggs] for k in _keys(line_aggs)}
            if self.flex:  # as pf's batch engine gives them: a dict as an AttrDict
                from promptflow.contracts.types import AttrDict

                agg = [AttrDict(v) if isinstance(v, dict) else v
                       for v in (d.get(FLEX_AGG) for d in line_aggs)]
            result = self.executor.exec_aggregation(inputs, agg, run_id=self.run_id)
        except Exception as exc:  # noqa: BLE001 - reported as the aggregation's failure
            log.exception("run %s: aggregation failed", self.run_id)
            return {"ok": False, "metrics": {}, "output": {}, "error": message_of(exc)}
        failed = [f"{name}: {(info.error or {}).get('message') or info.status}"
                  for name, info in (result.node_run_infos or {}).items()
                  if str(getattr(info.status, "value", info.status)) != "Completed"]
        return {"ok": not failed, "metrics": {k: plain(v) for k, v in result.metrics.items()},
                "output": {k: plain(v) for k, v in (result.output
                                                    if isinstance(result.output, dict)
                                                    else {}).items()},
                "error": "; ".join(failed) or None}


def calls_llms(flow_dir: Path, max_files: int = 200, max_bytes: int = 1 << 20) -> bool:
    """Does the flow call LLMs (an ``llm`` node, or code that names openai)? Then its lines'
    token usage is worth promptflow's tracing (which doubles the cost of a trivial line).
    Only the flow's own files are read (bounded; no symlink followed)."""
    seen = 0
    for root, dirs, files in os.walk(flow_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("__pycache__",
                                                                          "node_modules")]
        for name in files:
            if not name.endswith((".py", ".yaml", ".yml", ".prompty")):
                continue
            seen += 1
            if seen > max_files:
                return False
            f = open_regular(Path(root) / name)
            if f is None:
                continue
            with f:
                text = f.read(max_bytes).decode("utf-8", errors="replace")
            if "openai" in text.lower() or "type: llm" in text:
                return True
    return False


class _Chunk:
    """A chunk's lines in this worker: ``chunk_done`` once ``left`` is 0."""

    def __init__(self, chunk_id: Any, n: int):
        self.id, self.n, self.left = chunk_id, n, n
        self.failed, self.busy, self.started = 0, 0.0, time.monotonic()
        self.errors: list[list[Any]] = []
        self.usage: dict[str, int] = {}


USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")


def _usage(result: Any) -> dict[str, int]:
    """The line's token usage as promptflow counted it (its flow run's system metrics:
    llm nodes and the openai calls traced in python nodes)."""
    metrics = getattr(getattr(result, "run_info", None), "system_metrics", None) or {}
    out = {}
    for key in USAGE_KEYS:
        value = metrics.get(key) if isinstance(metrics, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            out[key] = int(value)
    return out


def _keys(dicts: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(k for d in dicts for k in d))


def serve(sock: socket.socket, supervisor: int, spec: dict[str, Any]) -> int:
    """A batch worker's life (``workers.spawn``'s ``serve``). Its stdout and stderr go to
    ``<run dir>/logs/<pid>.log``."""
    prepare_child(sock, supervisor, spec["flow"])
    logs = Path(spec["dir"]) / "logs"
    logs.mkdir(exist_ok=True)
    fd = os.open(logs / f"{os.getpid()}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        return _Runner(sock, spec).serve()
    except (BrokenPipeError, ConnectionResetError):  # the supervisor closed the channel
        log.info("run %s: worker %d: the run ended before this worker was needed",
                 spec["id"], os.getpid())
        return 0

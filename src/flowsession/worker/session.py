"""A session's state machine, inside its supervisor: phases (importing -> [standby ->]
loading -> ready | failed), the warm workers, the queue of lines, timeouts, the idle timeout
and how the session ends. The ops of the protocol (``flowsession.worker.protocol``) are here,
but for the batch runs' (``flowsession.worker.runops``); the I/O loop is
``flowsession.worker.loop``. Stdlib and promptflow only.

One thread serves everything (a selector loop). The only other thread of ours imports
promptflow at the start (so ``ping`` answers "importing" meanwhile); it has ended before the
first worker is forked. Workers are forked from this process after the import, so they share
the imported modules and load a small flow in milliseconds.
"""

from __future__ import annotations

import argparse
import logging
import os
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flowsession.worker import batch as bt
from flowsession.worker import workers as wk
from flowsession.worker.channel import Channel
from flowsession.worker.loop import BadRequest, Exit, Request, Server, number
from flowsession.worker.runops import RunOps
from flowsession.worker.protocol import (
    E_LINE_FAILED,
    E_LOAD_FAILED,
    E_SESSION_FAILED,
    E_STOPPED,
    E_TIMEOUT,
    E_WORKER_DIED,
    E_WRONG_PHASE,
    EXIT_FILE,
    PROTOCOL_VERSION,
    STATUS_FILE,
    Phase,
    WorkerState,
    describe_exit,
    error,
    flow_file,
    write_json,
)

log = logging.getLogger("flowsession.supervisor")
_CLOSED_GRACE = 5.0  # a worker whose channel closed but which has not exited is killed after
_DEATH_WINDOW, _MAX_DEATHS = 60.0, 10  # more workers dying than this in the window: failed


class Supervisor(RunOps, Server):
    def __init__(self, args: argparse.Namespace, state_dir: Path):
        super().__init__(args.socket, args.listen_fd)
        self.state_dir = state_dir
        self.standby = args.standby
        self.flow: str | None = args.flow
        self.site_dirs: list[str] = list(args.site_dir)
        self.idle_timeout = float(args.idle_timeout)
        self.line_timeout = float(args.line_timeout)
        self.n_workers = max(1, int(args.workers))
        self.phase, self.error = Phase.IMPORTING, None
        self.workers: list[wk.Worker] = []
        self.retired: list[wk.Worker] = []  # killed by us, not reaped yet
        self.by_channel: dict[Channel, wk.Worker] = {}
        self.queue: deque[wk.Line] = deque()
        self.pending: Request | None = None  # the adopt or reload that waits for the workers
        self.lines = 0
        self.stopping = False
        self.flow_dir: Path | None = None
        self.flow_yaml: Path | None = None
        self._import_error: str | None = None
        self._sites_added = False
        self.connections: dict[str, Any] = {}  # the flow's connections (promptflow's dicts)
        self.init: dict[str, Any] = {}  # a flex flow class's __init__ arguments
        self.flow_error: str | None = None  # why the flow does not load (the session lives on)
        self.batches: dict[str, bt.Batch] = {}  # runs, by id (ended ones are kept)
        self.batch_channels: dict[Channel, bt.Batch] = {}
        self.deaths: list[float] = []  # when workers died (not retired), recent ones
        self.last_death: str | None = None  # the last one's cause, in the status

    # --- the loop ------------------------------------------------------------------------

    def run(self) -> int:
        self.start()  # signals and the socket first: ping answers while promptflow imports
        self._start_import()
        return self.serve()

    def ops(self) -> dict[str, Callable[[Request], None]]:
        return {"adopt": self._op_adopt, "test": self._op_test, "reload": self._op_reload,
                "configure": self._op_configure, "shutdown": self._op_shutdown,
                "run": self._op_run, "run_status": self._op_run_status,
                "run_cancel": self._op_run_cancel, "aggregate": self._op_aggregate,
                "collect": self._op_collect, "run_forget": self._op_run_forget}

    def _start_import(self) -> None:
        self._imp_r, self._imp_w = socket.socketpair()
        self.sel.register(self._imp_r, selectors.EVENT_READ, self._on_imported)
        self._import_started = time.monotonic()

        def target() -> None:
            try:
                wk.import_promptflow()  # the 2 s import
            except BaseException as exc:  # noqa: BLE001 - reported as the session's failure
                self._import_error = f"{type(exc).__name__}: {exc}"
            finally:
                self._imp_w.send(b"x")

        self._importer = threading.Thread(target=target, name="import-promptflow", daemon=True)
        self._importer.start()

    def _on_imported(self, _mask: int) -> None:
        self._imp_r.recv(16)
        self._importer.join()  # no thread of ours runs from here on: forking is safe
        self.sel.unregister(self._imp_r)
        self._imp_r.close()
        self._imp_w.close()
        log.info("promptflow imported in %.2f s", time.monotonic() - self._import_started)
        if self._import_error:
            self._fail(f"promptflow failed to import: {self._import_error}")
        elif self.standby:
            self.phase, self.last_activity = Phase.STANDBY, time.monotonic()
            if self.pending is not None:  # an adopt that came while importing
                self._adopt(self.pending)
        else:
            self._load()

    def timeout(self) -> float:
        now, soon = time.monotonic(), 1.0
        for w in self.workers:
            if w.job is not None and w.job.deadline is not None:
                soon = min(soon, w.job.deadline - now)
        if self.idle_timeout > 0 and self.last_activity is not None:
            soon = min(soon, self.last_activity + self.idle_timeout - now)
        return max(0.0, soon)

    def tick(self) -> None:
        now = time.monotonic()
        for batch in self.batches.values():
            batch.tick(now)
        for w in list(self.workers):
            line = w.job
            if line is not None and line.deadline is not None and now >= line.deadline:
                log.warning("line %d ran over its %g s timeout: killing worker %d",
                            line.index, line.timeout, w.pid)
                self._retire(w)
                self.answer(line.req, error(E_TIMEOUT, f"the line ran over its timeout of "
                                            f"{line.timeout:g} s; its worker was replaced"))
                if self.phase in (Phase.LOADING, Phase.READY) and not w.draining:
                    self._spawn()
            elif w.closed_at is not None and w.alive and now - w.closed_at > _CLOSED_GRACE:
                w.kill()  # hung up but did not exit
        if (self.idle_timeout > 0 and self.last_activity is not None and not self.busy_now()
                and self.phase in (Phase.STANDBY, Phase.READY, Phase.FAILED)):
            idle = now - self.last_activity
            if idle >= self.idle_timeout:
                self._exit_session("idle", idle_seconds=round(idle, 3))

    def terminate(self) -> None:
        self._exit_session("terminated")

    def crashed(self, exc: BaseException) -> int:
        self._exit_session("crashed", code=1, error=f"{type(exc).__name__}: {exc}")
        return 1

    # --- ops -----------------------------------------------------------------------------

    def busy_now(self) -> bool:
        """A request is being served or a run is going: not idle."""
        return bool(self.active) or any(b.active for b in self.batches.values())

    def status(self) -> dict[str, Any]:
        idle = 0.0
        if not self.busy_now() and self.last_activity is not None:
            idle = time.monotonic() - self.last_activity
        busy = sum(1 for w in self.workers if w.job is not None)
        busy += sum(1 for b in self.batches.values() for x in b.workers if x.chunk)
        return {
            "ok": True, "pid": os.getpid(), "phase": self.phase,
            "busy": busy, "queued": len(self.queue),
            "idle_seconds": round(idle, 3), "idle_timeout": self.idle_timeout,
            "line_timeout": self.line_timeout, "workers": [w.to_json() for w in self.workers],
            "error": self.error, "flow": self.flow, "lines": self.lines,
            "standby": self.standby, "protocol": PROTOCOL_VERSION,
            "runs": {b.id: b.state for b in self.batches.values()},
            "flow_error": self.flow_error, "last_worker_death": self.last_death,
        }

    def _op_test(self, req: Request) -> None:
        if self.phase == Phase.FAILED:
            self.answer(req, error(E_SESSION_FAILED,
                                    f"the session failed: {self.error}; reset the session"))
            return
        if self.phase == Phase.STANDBY or (self.standby and self.phase == Phase.IMPORTING):
            self.answer(req, error(E_WRONG_PHASE, "this session is a standby without a flow: "
                                    "adopt a flow first"))
            return
        inputs = req.msg.get("inputs", {})
        if not isinstance(inputs, dict):
            raise BadRequest("'inputs' must be a JSON object")
        timeout = number(req.msg, "timeout", self.line_timeout)
        if self._take_flow_settings(req.msg) and self.phase == Phase.READY:
            self._renew_workers()  # other connections or init: workers that have them
        if self.phase == Phase.READY and not self.workers:  # the flow did not load: try again
            self._load()
        self.queue.append(wk.Line(req, inputs, timeout))
        self._dispatch()

    def _take_flow_settings(self, msg: dict[str, Any]) -> bool:
        """``connections`` and ``init`` of an adopt or a test; True if they changed."""
        changed = False
        for key in ("connections", "init"):
            if key in msg:
                value = msg[key] or {}
                if not isinstance(value, dict):
                    raise BadRequest(f"'{key}' must be an object")
                if value != getattr(self, key):
                    setattr(self, key, value)
                    changed = True
        return changed

    def _renew_workers(self) -> None:
        for w in list(self.workers):
            if w.job is None or not w.alive:
                self._retire(w)
            else:
                w.draining = True
        self._load()

    def _op_adopt(self, req: Request) -> None:
        if not (self.standby and self.phase in (Phase.IMPORTING, Phase.STANDBY)) or self.pending:
            self.answer(req, error(E_WRONG_PHASE, f"only a standby session waiting for a flow "
                                    f"adopts one; this one is {self.phase}"
                                    + (f" with {self.flow}" if self.flow else "")))
            return
        msg = req.msg
        if not isinstance(msg.get("flow"), str) or not msg["flow"]:
            raise BadRequest("'flow' must be the flow's folder")
        sites, env = msg.get("site_dirs") or [], msg.get("env") or {}
        if not isinstance(sites, list) or not all(isinstance(s, str) for s in sites):
            raise BadRequest("'site_dirs' must be a list of folders")
        if not isinstance(env, dict):
            raise BadRequest("'env' must be an object of strings")
        self.idle_timeout = number(msg, "idle_timeout", self.idle_timeout)
        self.line_timeout = number(msg, "line_timeout", self.line_timeout)
        self.n_workers = max(1, int(number(msg, "workers", self.n_workers)))
        self._take_flow_settings(msg)
        self.pending = req
        if self.phase == Phase.STANDBY:
            self._adopt(req)

    def _adopt(self, req: Request) -> None:
        msg = req.msg
        os.environ.update({str(k): str(v) for k, v in (msg.get("env") or {}).items()})
        self.flow, self.site_dirs = msg["flow"], list(msg.get("site_dirs") or [])
        log.info("adopting %s", self.flow)
        self._load()

    def _op_reload(self, req: Request) -> None:
        """New workers load the flow (a changed copy in ``flow``, or the same folder again);
        lines running on the old ones finish there first."""
        if self.phase != Phase.READY or self.pending:
            kind = E_SESSION_FAILED if self.phase == Phase.FAILED else E_WRONG_PHASE
            self.answer(req, error(kind, f"only a ready session reloads its flow; this one is "
                                   f"{self.phase}" + (f": {self.error}" if self.error else "")))
            return
        flow = req.msg.get("flow", self.flow)
        if not isinstance(flow, str) or not flow:
            raise BadRequest("'flow' must be the flow's folder")
        self.flow, self.pending = flow, req
        log.info("reloading %s", self.flow)
        self._renew_workers()

    def _op_configure(self, req: Request) -> None:
        self.idle_timeout = number(req.msg, "idle_timeout", self.idle_timeout)
        self.line_timeout = number(req.msg, "line_timeout", self.line_timeout)
        log.info("configured: idle timeout %g s, line timeout %g s",
                 self.idle_timeout, self.line_timeout)
        self.answer(req, self.status())

    def _op_shutdown(self, req: Request) -> None:
        self._exit_session(str(req.msg.get("reason") or "shutdown"), reply_to=req)

    # --- workers -------------------------------------------------------------------------

    def _load(self) -> None:
        self.flow_dir = Path(self.flow or ".").resolve()
        self.flow_yaml = flow_file(self.flow_dir)
        if self.flow_yaml is None:
            self._fail(f"no flow.dag.yaml or flow.flex.yaml in {self.flow_dir}")
            return
        if not self._sites_added:
            wk.add_site_dirs(self.site_dirs)
            self._sites_added = True
        if self.phase != Phase.READY or self.pending is not None:
            self.phase = Phase.LOADING
        self.flow_error = None
        self._load_started = time.monotonic()
        for _ in range(self.n_workers):
            self._spawn()

    def _spawn(self) -> None:
        flow_dir, flow_yaml, connections, init = (self.flow_dir, self.flow_yaml,
                                                  self.connections, self.init)
        w = wk.spawn(flow_dir, flow_yaml, self.sel, self._on_worker_message,
                     self._on_worker_closed, self.close_in_child,
                     serve=lambda sock, sup: wk.serve_tests(sock, flow_dir, flow_yaml, sup,
                                                            connections, init))
        self.workers.append(w)
        self.by_channel[w.channel] = w

    def _on_worker_message(self, ch: Channel, msg: dict[str, Any] | None) -> None:
        w = self.by_channel.get(ch)
        if msg is not None and msg.get("event") == "crashed":  # its last words, before it exits
            found = w or (self._batch_of(ch) or (None, None))[1]
            dying = found.worker if isinstance(found, bt.BatchWorker) else found
            if dying is not None:
                dying.crash = str(msg.get("error") or "")[:2000] or None
            return
        if w is None and msg is not None:
            found = self._batch_of(ch)
            if found is not None:
                found[0].on_message(found[1], msg)
            return
        if w is None or w.retired or msg is None:
            return
        event = msg.get("event")
        if event == "loaded":
            w.state = WorkerState.IDLE
            log.info("worker %d loaded the flow", w.pid)
            if self.phase == Phase.LOADING and all(x.state != WorkerState.LOADING
                                                   for x in self.workers):
                self._ready()
            self._dispatch()
        elif event == "load_failed":
            self._flow_does_not_load(w, str(msg.get("error")))
        elif event == "result" and w.job is not None:
            line, w.job, w.state = w.job, None, WorkerState.IDLE
            response = {k: v for k, v in msg.items() if k != "event"}
            if response.get("ok"):
                response.update(duration=round(time.monotonic() - line.started, 6),
                                index=line.index, worker=w.pid)
            self.answer(line.req, response)
            if w.draining:
                self._retire(w)
            self._dispatch()

    def _flow_does_not_load(self, w: wk.Worker, reason: str) -> None:
        """The flow's code, YAML, connections or init are wrong: the session stays (the
        environment is fine), lines are refused with the reason, and the next test or reload
        tries again."""
        self._retire(w)
        self.flow_error = f"the flow failed to load: {reason}"
        log.warning("%s", self.flow_error)
        if any(x.state != WorkerState.DEAD for x in self.workers):
            return
        for x in list(self.workers):
            self._retire(x)
        while self.queue:
            self.answer(self.queue.popleft().req, error(E_LINE_FAILED, self.flow_error))
        if self.phase == Phase.LOADING:
            self._ready()

    def _ready(self) -> None:
        self.phase, self.last_activity = Phase.READY, time.monotonic()
        took = time.monotonic() - self._load_started
        log.info("ready: %d worker(s) loaded %s in %.3f s", len(self.workers), self.flow, took)
        if self.pending is not None:
            req, self.pending = self.pending, None
            self.answer(req, {**self.status(), f"{req.op}_seconds": round(took, 6)})

    def _dispatch(self) -> None:
        while self.queue and self.phase in (Phase.LOADING, Phase.READY):
            w = next((w for w in self.workers if w.state == WorkerState.IDLE and w.alive), None)
            if w is None:
                return
            line = self.queue.popleft()
            if line.req.client.channel.closed:  # nobody is waiting for it any more
                self.answer(line.req, error(E_STOPPED, "the client went away"))
                continue
            line.index, self.lines = self.lines, self.lines + 1
            line.started = time.monotonic()
            line.deadline = line.started + line.timeout if line.timeout > 0 else None
            w.job, w.state = line, WorkerState.BUSY
            w.channel.send({"op": "line", "inputs": line.inputs, "index": line.index})

    def _retire(self, w: wk.Worker) -> None:
        """Kill a worker on purpose (a line timeout, a reload): its death fails nothing."""
        w.retired, w.job = True, None
        self.workers.remove(w)
        if w.alive:
            w.kill()
            self.retired.append(w)
        self.by_channel.pop(w.channel, None)
        w.channel.close()

    def _on_worker_closed(self, ch: Channel) -> None:
        w = self.by_channel.get(ch)
        if w is None:
            found = self._batch_of(ch)
            w = found[1].worker if found else None
        if w is not None and not w.retired:
            w.closed_at = time.monotonic()
            self._reap()  # usually it has exited already; else SIGCHLD follows

    def child_exited(self) -> None:
        self._reap()

    def _reap(self) -> None:
        """Collect our workers that exited (by pid: never another thread's subprocess)."""
        for w in [*self.workers, *self.retired, *self._batch_workers()]:
            if w.exit is not None:
                continue
            try:
                pid, status = os.waitpid(w.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = w.pid, 0  # reaped elsewhere; its status is lost
            if pid:
                self._on_exit(pid, status)

    def _batch_workers(self) -> list[wk.Worker]:
        return [w for batch in self.batches.values() for w in batch.all_workers()]

    def _on_exit(self, pid: int, status: int) -> None:
        for batch in self.batches.values():
            b = next((b for b in batch.workers if b.worker.pid == pid), None)
            if b is not None:
                b.worker.exit, b.worker.state = describe_exit(status), WorkerState.DEAD
                if not b.worker.channel.closed:
                    b.worker.channel.close()
                if not self.stopping:
                    batch.on_exit(b, os.WEXITSTATUS(status) if os.WIFEXITED(status) else None)
                return
        for w in self.retired:
            if w.pid == pid:
                w.exit = describe_exit(status)
                self.retired.remove(w)
                return
        w = next((w for w in self.workers if w.pid == pid), None)
        if w is None:
            return
        w.exit = describe_exit(status)
        if not w.channel.closed:
            w.channel.drain()  # its last messages: a result, the cause it died of
        was_loading, line = w.state == WorkerState.LOADING, w.job
        w.state, w.job = WorkerState.DEAD, None
        if self.stopping:
            return
        reason = f"worker {pid} " + ("was " + w.exit if w.exit.startswith("killed") else w.exit)
        if w.crash:
            reason += f" ({w.crash})"
        log.error("%s", reason)
        self._worker_died(w, reason, line, was_loading)

    def _worker_died(self, w: wk.Worker, reason: str, line: wk.Line | None,
                     was_loading: bool) -> None:
        """A worker died: its line fails (the line's failure, not the session's) and a new
        worker takes its place. One that dies loading the flow is the flow's failure to load;
        workers dying over and over fail the session."""
        now = time.monotonic()
        self.deaths = [t for t in self.deaths if now - t < _DEATH_WINDOW] + [now]
        self.last_death = f"{reason}; a new worker took its place"
        if line is not None:
            self.last_death = f"{reason} while running a line; a new worker took its place"
            self.answer(line.req, error(E_WORKER_DIED, self.last_death))
        if len(self.deaths) > _MAX_DEATHS:
            self._fail(f"{reason}: {len(self.deaths)} workers died within "
                       f"{_DEATH_WINDOW:g} s")
            return
        if was_loading:
            self._flow_does_not_load(w, reason + " while loading the flow")
            return
        self.workers.remove(w)
        self.by_channel.pop(w.channel, None)
        if self.phase in (Phase.LOADING, Phase.READY) and not w.draining:
            self._spawn()
        self._dispatch()

    def _fail(self, reason: str) -> None:
        if self.phase == Phase.FAILED:
            return
        self.phase, self.error = Phase.FAILED, reason
        if self.last_activity is None:
            self.last_activity = time.monotonic()
        log.error("session failed: %s", reason)
        write_json(self.state_dir / STATUS_FILE, {"phase": Phase.FAILED, "error": reason,
                                                  "at": time.time()})
        if self.pending is not None:
            req, self.pending = self.pending, None
            self.answer(req, error(E_LOAD_FAILED, reason))
        while self.queue:
            self.answer(self.queue.popleft().req, error(
                E_SESSION_FAILED, f"the session failed: {reason}; reset the session"))

    # --- the end -------------------------------------------------------------------------

    def _exit_session(self, reason: str, *, code: int = 0, reply_to: Request | None = None,
                      **extra: Any) -> None:
        if self.stopping:
            return
        self.stopping = True
        log.info("stopping: %s %s", reason, extra or "")
        write_json(self.state_dir / EXIT_FILE, {"reason": reason, "at": time.time(), **extra})
        everyone = self.workers + self.retired + self._batch_workers()
        for w in everyone:
            w.kill()
        for w in everyone:
            try:
                os.waitpid(w.pid, 0)
            except ChildProcessError:
                pass
        gone = error(E_STOPPED, f"the session stopped ({reason})")
        for req in list(self.active):
            if req is not reply_to:
                self.answer(req, gone)
        self.remove_socket()
        if reply_to is not None:
            self.answer(reply_to, {"ok": True, "pid": os.getpid()})
        self.flush_clients(timeout=1.0)
        raise Exit(code)



"""Warm workers: processes forked from the supervisor (after promptflow is imported, so the
imports are shared and a worker is ready in milliseconds), each with the flow loaded in a
``FlowExecutor``, serving lines over a socketpair. Stdlib and promptflow only.

Supervisor -> worker: ``{"op": "line", "inputs": {...}, "index": n}``
Worker -> supervisor: ``{"event": "loaded"}`` | ``{"event": "load_failed", "error": str}`` |
``{"event": "result", "ok": true, "output": {...}}`` |
``{"event": "result", "ok": false, "error": {"type": "line_failed", "message": str}}`` |
``{"event": "crashed", "error": "ValueError: ..."}`` (its last words, any worker kind)
"""

from __future__ import annotations

import faulthandler
import importlib
import json
import logging
import os
import selectors
import signal
import site
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowsession.worker.channel import Channel
from flowsession.worker.flowenv import apply_flow_environment
from flowsession.worker.outputs import describe, flow_outputs, media_encoder, plain
from flowsession.worker.protocol import E_LINE_FAILED, WorkerState, encode

log = logging.getLogger("flowsession.worker")


@dataclass(eq=False)
class Line:
    """A ``test`` request's line: queued, then run by one worker."""

    req: Any  # the loop's Request, answered with the result
    inputs: dict[str, Any]
    timeout: float  # seconds on the worker; 0: no limit
    index: int = -1
    started: float = 0.0
    deadline: float | None = None


@dataclass
class Worker:
    """The supervisor's view of one worker process."""

    pid: int
    channel: Channel
    state: WorkerState = WorkerState.LOADING
    exit: str | None = None  # "exited with code 1" | "killed by SIGKILL" once reaped
    crash: str | None = None  # the last line of the traceback it died of, if it could say
    job: Line | None = None  # the line it runs
    retired: bool = False  # killed by the supervisor (line timeout, shutdown): not a failure
    draining: bool = False  # has an old version of the flow: retired when its line ends
    closed_at: float | None = None  # when its channel hit EOF
    started_at: float = field(default_factory=time.monotonic)

    @property
    def alive(self) -> bool:
        return self.exit is None

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "alive": self.alive, "exit": self.exit, "state": self.state}

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def spawn(flow_dir: Path, flow_yaml: Path, sel: selectors.BaseSelector,
          on_message: Callable[[Channel, dict | None], None],
          on_close: Callable[[Channel], None],
          close_in_child: Callable[[], None],
          serve: Callable[[socket.socket, int], int] | None = None) -> Worker:
    """Fork a worker that loads the flow; it reports ``loaded`` or ``load_failed``.
    ``serve(sock, supervisor_pid)`` is the child's life (default: test lines); its return
    value is the exit code.

    Call only from the main thread with no thread of the supervisor's own running.
    ``close_in_child`` closes the supervisor's sockets in the child (it must not touch the
    selector's registrations: the epoll instance is shared with the parent)."""
    parent_end, child_end = socket.socketpair()
    supervisor = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the worker: never returns
        code = 1
        try:
            parent_end.close()
            close_in_child()
            if serve is None:
                code = _serve(child_end, flow_dir, flow_yaml, supervisor)
            else:
                code = serve(child_end, supervisor)
        except BaseException as exc:  # noqa: BLE001 - last resort: say why, then exit
            try:
                log.exception("worker %d crashed", os.getpid())
                cause = traceback.format_exception_only(type(exc), exc)[-1].strip()
                child_end.sendall(encode({"event": "crashed", "error": cause[:2000]}))
            except BaseException:  # noqa: BLE001, S110 - nowhere left to say it
                pass
        finally:
            try:
                logging.shutdown()
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    child_end.close()
    return Worker(pid=pid, channel=Channel(parent_end, sel, on_message, on_close))


def import_promptflow() -> None:
    """The slow imports, done once in the supervisor so that every forked worker has them:
    the executor (~2 s), and what ``FlowExecutor.create`` would otherwise import lazily in
    each worker (openai's resources, promptflow.tools: ~100 ms). Only image packages: a
    flow's environment adds packages, it never replaces the image's."""
    from promptflow.executor import FlowExecutor  # noqa: F401

    try:
        import promptflow.tools  # noqa: F401
    except ImportError:
        pass
    try:  # private, so best effort
        from promptflow.tracing._integrations._openai_injector import (
            available_openai_apis_and_injectors,
        )

        list(available_openai_apis_and_injectors())
    except Exception:  # noqa: BLE001, S110 - only a warm-up
        pass


def add_site_dirs(dirs: list[str]) -> None:
    """Add the environment's site-packages (and its .pth files) ahead of the image's, the way
    the environment's own interpreter orders them."""
    if not dirs:
        return
    before = list(sys.path)
    for d in dirs:
        site.addsitedir(d)
    added = [p for p in sys.path if p not in before]
    at = next((i for i, p in enumerate(before) if "site-packages" in p), len(before))
    sys.path[:] = before[:at] + added + before[at:]
    importlib.invalidate_caches()


# --- inside the worker ----------------------------------------------------------------------

def prepare_child(sock: socket.socket, supervisor: int, flow_dir: Path | str) -> None:
    """A forked worker's first steps: default signal handling, die with the supervisor, and
    the flow's files in its working directory (``link_flow_files``)."""
    link_flow_files(Path(flow_dir))
    signal.set_wakeup_fd(-1)
    faulthandler.enable()  # a crash in C code leaves the Python stack in the session's log
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    _die_with(supervisor)
    sock.setblocking(True)


def _serve(sock: socket.socket, flow_dir: Path, flow_yaml: Path, supervisor: int) -> int:
    return serve_tests(sock, flow_dir, flow_yaml, supervisor, {}, {})


def serve_tests(sock: socket.socket, flow_dir: Path, flow_yaml: Path, supervisor: int,
                connections: dict[str, Any], init: dict[str, Any]) -> int:
    """A test worker's life: load the flow (with the session's connections and init), then
    run the lines the supervisor sends."""
    prepare_child(sock, supervisor, flow_dir)

    def send(obj: dict[str, Any]) -> None:
        sock.sendall(encode(obj))

    from promptflow.executor import FlowExecutor

    apply_flow_environment(flow_yaml, connections)
    started = time.monotonic()
    try:
        executor = FlowExecutor.create(flow_yaml, dict(connections), working_dir=flow_dir,
                                       raise_ex=False, init_kwargs=dict(init) or None)
    except Exception as exc:  # the flow's code does not import, its yaml is wrong, ...
        log.exception("worker %d: the flow failed to load", os.getpid())
        send({"event": "load_failed", "error": message_of(exc)})
        return 1
    log.info("worker %d: flow %s loaded in %.3f s", os.getpid(), flow_dir,
             time.monotonic() - started)
    declared = set(getattr(getattr(executor, "_flow", None), "outputs", None) or ())
    media = media_encoder(flow_yaml, flow_dir)
    send({"event": "loaded"})

    reader = sock.makefile("rb")
    for raw in reader:
        try:
            msg = json.loads(raw)
        except ValueError:
            continue
        if msg.get("op") == "line":
            result = run_line(executor, msg.get("inputs") or {}, msg.get("index"), declared,
                              media)
            try:
                data = encode({"event": "result", **result})
            except Exception as exc:  # noqa: BLE001 - a circular output, a __str__ that raises
                data = encode({"event": "result", "ok": False, "error": {
                    "type": E_LINE_FAILED,
                    "message": f"the line's output cannot be sent: {describe(exc)}"}})
            sock.sendall(data)
    return 0  # the supervisor closed the channel


def run_line(executor: Any, inputs: dict[str, Any], index: int | None,
             declared: set[str], media: Callable[[Any], Any] | None = None) -> dict[str, Any]:
    """Run one line; ok with the outputs, or a line_failed error with the exception's type
    and message. Whatever the flow returns or raises, this returns."""
    try:
        result = executor.exec_line(inputs, index=index)
        run_info = result.run_info
        status = str(getattr(run_info.status, "value", run_info.status))
        if status != "Completed":
            err = run_info.error or {}
            message = err.get("message") or f"the line ended with status {status}"
            return {"ok": False, "error": {"type": E_LINE_FAILED, "message": message},
                    "trace": node_trace(result)}
        # the outputs first: a generator the flow returns is consumed once, for its outputs
        output = flow_outputs(result.output, index, declared, media)
        return {"ok": True, "output": output, "trace": node_trace(result)}
    except BaseException as exc:  # noqa: BLE001 - refused inputs, sys.exit in the flow, ...
        log.warning("worker %d: line %s failed", os.getpid(), index, exc_info=True)
        return {"ok": False, "error": {"type": E_LINE_FAILED, "message": describe(exc)}}


def node_trace(result: Any) -> list[dict[str, Any]]:
    """Each node's inputs, output, duration (s), status (Bypassed for a skipped one) and
    error, in the order they started: a test's trace."""
    trace = []
    for name, info in (getattr(result, "node_run_infos", None) or {}).items():
        start, end = getattr(info, "start_time", None), getattr(info, "end_time", None)
        try:
            duration = round((end - start).total_seconds(), 6)
        except (TypeError, AttributeError):
            duration = None
        err = getattr(info, "error", None) or {}
        usage = getattr(info, "system_metrics", None) or {}
        tokens = {k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")
                  if isinstance(usage, dict) and isinstance(usage.get(k), int)}
        trace.append({"node": str(name), "tokens": tokens,
                      "status": str(getattr(info.status, "value", info.status)),
                      "inputs": {k: plain(v) for k, v in (getattr(info, "inputs", None)
                                                          or {}).items()},
                      "output": plain(getattr(info, "output", None)),
                      "duration": duration, "start": str(start or ""),
                      "error": err.get("message") if isinstance(err, dict) else str(err)})
    trace.sort(key=lambda t: t["start"])
    return trace



def message_of(exc: BaseException) -> str:
    """promptflow's own message when it has one (it names the node and the inner error)."""
    message = getattr(exc, "message", None)
    if not isinstance(message, str) or not message:
        message = str(exc) or type(exc).__name__
    inner = getattr(exc, "inner_exception", None) or exc.__cause__
    if inner is not None and str(inner) and str(inner) not in message:
        message = f"{message.rstrip('.')}: ({type(inner).__name__}) {inner}"
    return message


def link_flow_files(flow_dir: Path) -> None:
    """prompt flow runs a flow in its own folder, so flow code opens its files by relative
    paths. Here the flow is read-only and the working directory is the session's private
    one: it gets a link to each of the flow's top-level files and folders (an existing link
    is pointed at this flow; a file the flow wrote is left alone), so relative paths read
    the flow's files and what the flow writes stays in the working directory. Where the
    working directory cannot take links, the worker works in the flow's folder instead."""
    work = Path.cwd()
    try:
        entries = list(os.scandir(flow_dir))
        if work.resolve() == flow_dir.resolve() or not os.access(work, os.W_OK):
            raise PermissionError(str(work))
        for entry in entries:
            link = work / entry.name
            if link.is_symlink():
                if os.readlink(link) == entry.path:
                    continue
                tmp = work / f".{entry.name}.{os.getpid()}.link"
                os.symlink(entry.path, tmp)
                os.replace(tmp, link)
            elif not link.exists():
                try:
                    os.symlink(entry.path, link)
                except FileExistsError:  # another worker made it meanwhile
                    pass
    except OSError:
        os.chdir(flow_dir)


def _die_with(supervisor: int) -> None:
    """SIGKILL this worker when the supervisor dies (Linux), so no worker outlives it."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != supervisor:  # it died before prctl took effect
        raise SystemExit(1)

"""The session supervisor's protocol: JSON lines over a Unix socket. Stdlib only.

The control plane imports this module (``request``, ``Connection``, the constants); the
supervisor (``flowsession.worker.supervisor``) implements the server side.

Starting a session
------------------
::

    python -m flowsession.worker.supervisor (--socket PATH | --listen-fd N) --state-dir DIR
        [--log-inherit] [--standby] [--flow DIR] [--site-dir DIR ...] [--idle-timeout S]
        [--workers N] [--line-timeout S]

With ``--socket`` the supervisor binds the socket (mode 0600) itself; with ``--listen-fd`` it
answers on a listening socket its starter bound where the session cannot write (so flow code
cannot replace it), and with ``--log-inherit`` it logs to the stderr it was given instead of
``DIR/supervisor.log``. Either way it listens before promptflow is imported, so ``ping``
answers within milliseconds of the start, with phase ``importing``. Poll ``ping`` until the phase is ``ready``
(or ``standby``, or ``failed``). Everything the supervisor and its workers print or log goes to
``DIR/supervisor.log``. ``--idle-timeout`` 0 (the default) means never; it counts in the
standby, ready and failed phases (never while a request is active or a line runs).
``--line-timeout`` (default 600 s) applies to lines whose ``test`` gives no ``timeout``; 0
means none. The working directory is ``DIR/../work`` when it exists, else ``DIR``;
``PF_DISABLE_TRACING`` defaults to true. The supervisor calls setsid() and ignores SIGHUP,
so it outlives the process that started it. Socket paths longer than sun_path allows work
(through /proc/self/fd): use ``connect``/``request`` here to reach them.

Phases: ``importing`` -> [``standby`` -> (adopt)] -> ``loading`` -> ``ready``; any of them may
end in ``failed`` (``error`` says why; ``ping`` still answers, ``test`` is refused, a reset
of the session recovers).

Wire format
-----------
A client connects, writes one request line ``{"op": ..., ...}\\n`` and reads one response line;
it may send more requests on the same connection (they are answered in order). Every response
has ``"ok": true|false``; on false it has ``"error": {"type": str, "message": str}``. Error types
are the ``E_*`` constants below.

``ping`` -- does not count as activity::

    -> {"op": "ping"}
    <- {"ok": true, "pid": int, "phase": str, "busy": int (lines executing now),
        "queued": int (lines waiting for a worker), "idle_seconds": float (since the last
        non-ping request finished, or since ready/standby; 0 while anything is active),
        "idle_timeout": float, "line_timeout": float,
        "workers": [{"pid": int, "alive": bool, "exit": null | "exited with code 1" |
                     "killed by SIGKILL", "state": "loading"|"idle"|"busy"|"dead"}],
        "error": null | str, "flow": null | str, "lines": int (lines run so far),
        "standby": bool (started as a standby), "protocol": int}

``adopt`` -- standby only (else ``wrong_phase``); answers once the workers have the flow loaded
(an adopt sent while the standby is still importing waits for the import). ``env`` is set in
the supervisor's environment before the workers are forked; ``site_dirs`` are added with
``site.addsitedir`` (their .pth files run) ahead of the image's site-packages::

    -> {"op": "adopt", "flow": DIR, "site_dirs": [DIR, ...], "idle_timeout": s,
        "workers": n, "env": {"K": "V"}, "line_timeout": s (optional)}
    <- the ping fields, plus "adopt_seconds": float
    <- {"ok": false, "error": {"type": "load_failed", "message": ...}}   (phase is now failed)

``test`` -- one line on a free worker (queued while all are busy, or while importing/loading)::

    -> {"op": "test", "inputs": {...}, "timeout": s (optional: seconds the line may run on its
        worker, queueing not counted; default the session's line_timeout; 0 means no limit)}
    <- {"ok": true, "output": {...}, "duration": s, "index": n, "worker": pid}
    <- {"ok": false, "error": {"type": "line_failed" | "timeout" | "session_failed" |
                                        "wrong_phase" | "stopped" | "bad_request", ...}}

  Output values that are not JSON-serialisable are sent as ``str(value)``; generators are
  consumed (into a string when every item is a string, else a list). A line over its timeout
  has its worker killed and replaced; the session stays ready.

``reload`` -- ready only (else ``wrong_phase``, or ``session_failed``): new workers load the
flow from ``flow`` (a changed copy; default: the same folder again), new lines wait for them,
lines running on the old workers finish there first; answers once the new workers are loaded
(site dirs, env and settings stay)::

    -> {"op": "reload", "flow": DIR (optional)}
    <- the ping fields, plus "reload_seconds": float
    <- {"ok": false, "error": {"type": "load_failed", "message": ...}}   (phase is now failed)

``configure`` -- change settings in place; answers with the ping fields::

    -> {"op": "configure", "idle_timeout": s, "line_timeout": s (optional)}

``shutdown`` -- writes ``DIR/exit.json``, kills the workers, removes the socket, answers, exits 0::

    -> {"op": "shutdown", "reason": str}
    <- {"ok": true, "pid": int}

Batch runs (``flowsession.worker.batch``)
----------------------------------------
A run has its own workers, loaded with the run's flow (``flow``: a copy with a variant chosen,
default the session's), ``env``, ``connections`` (promptflow's dict form: in memory only),
``init`` and ``node_override``. Its lines travel in the request (``inputs``: one JSON object per
line; a line's position is its line number there); the supervisor keeps them, and the records
its workers write, in the run's folder ``DIR/runs/<id>/`` -- its own: nobody outside the session
reads it by path. Positions already recorded there are not run again::

    -> {"op": "run", "id": str, "inputs": str (optional once sent), "flow": DIR (optional),
        "lines": [pos, ...] | null (null: every line), "workers": n (processes),
        "concurrency": n (lines in flight, spread over the workers; default: one per worker;
        at most MAX_CONCURRENCY), "line_timeout": s,
        "env": {...}, "connections": {...}, "init": {...}, "node_override": {...}}
    <- {"ok": true, "run": {"id", "state": "loading"|"running"|"completed"|"canceled"|"failed",
        "total", "done", "ran", "failed", "skipped", "errors": [[pos, message], ...],
        "error", "workers", "restarts", "aggregation", "started_at", "ended_at",
        "lines_per_second", "concurrency", "in_flight_limit" (lowered on 429s),
        "throttled" (429s seen), "throttled_at", "usage": {token counts}, "suspects"}}          (answers at once; a run already going answers its status)
    -> {"op": "run_status", "id": str}      <- {"ok": true, "run": {...} | null}
    -> {"op": "run_cancel", "id": str}      <- {"ok": true, "run": {...} | null}
    -> {"op": "collect", "id": str, "cursor": {name: offset}, "max_bytes": n}
    <- {"ok": true, "records": [JSON text, ...], "logs": {worker: text}, "cursor": {...},
        "more": bool}     (what the workers wrote past ``cursor``; a record over 8 MB comes as a
                           failed one saying so; FIFOs, symlinks and devices are skipped)
    -> {"op": "run_forget", "id": str}      <- {"ok": true}   (an ended run's folder removed)
    -> {"op": "aggregate", <the run's fields>, "records": str (JSON lines)}
    <- {"ok": true, "aggregated": bool, "metrics": {...}, "output": {...}, "error": str|null}
       (the aggregation nodes over those records; answers when done)

Whatever a session answers is untrusted: the control plane validates and bounds it
(``flowsession.backends.compute.boundary``).

A running run counts as activity (no idle exit; ``busy`` counts its working workers).

Files in the state dir
----------------------
- ``supervisor.log``: the supervisor's and the workers' stdout, stderr and logging.
- ``exit.json``: written just before the supervisor exits:
  ``{"reason": "idle"|"terminated"|<shutdown reason>|"crashed", "at": epoch, ...}``
  (``idle_seconds`` for idle, ``error`` for crashed).
- ``status.json``: written when the session fails:
  ``{"phase": "failed", "error": str, "at": epoch}``.

SIGTERM (and SIGINT) act like ``shutdown`` with reason ``terminated``. A worker that dies (e.g.
killed with SIGKILL) fails the session ("worker 1234 was killed by SIGKILL"); it is not
respawned. Workers die with their supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import Iterator, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any, Self

PROTOCOL_VERSION = 1


class Phase(StrEnum):
    """A supervisor's phase (``ping``'s ``phase``)."""

    IMPORTING = "importing"
    STANDBY = "standby"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


class WorkerState(StrEnum):
    """A worker's state (``ping``'s ``workers[].state``)."""

    LOADING = "loading"
    IDLE = "idle"
    BUSY = "busy"
    DEAD = "dead"


class RunState(StrEnum):
    """A batch run's state in its supervisor (``run``'s ``state``)."""

    LOADING = "loading"
    RUNNING = "running"
    COMPLETED = "completed"
    CANCELED = "canceled"
    FAILED = "failed"


RUN_ENDED = frozenset({RunState.COMPLETED, RunState.CANCELED, RunState.FAILED})

# error types
E_BAD_REQUEST = "bad_request"  # not JSON, unknown op, a field of the wrong type
E_WRONG_PHASE = "wrong_phase"  # adopt on a non-standby, test on a standby, reload unready
E_LOAD_FAILED = "load_failed"  # the flow failed to load (adopt's or reload's answer)
E_LINE_FAILED = "line_failed"  # the line ran and failed (or its inputs were refused)
E_TIMEOUT = "timeout"  # the line ran over its timeout; its worker was replaced
E_SESSION_FAILED = "session_failed"  # the session is failed: reset it
E_WORKER_DIED = "worker_died"  # the line's worker died running it; a new one took its place
E_STOPPED = "stopped"  # the session stopped while the request waited

# files in the state dir
LOG_FILE = "supervisor.log"
EXIT_FILE = "exit.json"
STATUS_FILE = "status.json"

DEFAULT_LINE_TIMEOUT = 600.0
MAX_CONCURRENCY = 1024  # a run's lines in flight, at most
FLOW_FILES = ("flow.dag.yaml", "flow.dag.yml", "flow.flex.yaml", "flow.flex.yml")
MAX_LINE = 64 * 1024 * 1024  # the longest request/response line accepted

_LARGE_OPS = ("run", "aggregate", "adopt", "test")  # requests that may carry megabytes
_MAX_SUN_PATH = 100  # sockaddr_un's sun_path is 108 bytes, NUL included


class ProtocolError(ConnectionError):
    """The supervisor closed the connection without answering, or answered garbage."""


class AnswerTooLong(ProtocolError):
    """The answer is longer than the request's answer can be (``MAX_ANSWER``)."""


# The longest answer the control plane reads to each request (others: MAX_LINE). Parsing JSON
# costs up to ~25 times its size in memory (an array of empty objects), so a request whose
# answer is small by nature never reads more than it needs.
MAX_ANSWER = {"ping": 1 << 20, "configure": 1 << 20, "shutdown": 1 << 20, "adopt": 1 << 20,
              "reload": 1 << 20, "run": 4 << 20, "run_status": 4 << 20,
              "run_cancel": 4 << 20, "run_forget": 4 << 20, "test": 16 << 20,
              "aggregate": 16 << 20}


def encode(obj: Any) -> bytes:
    """One JSON line; values JSON cannot carry are sent as ``str(value)``."""
    return (json.dumps(obj, default=str, separators=(",", ":")) + "\n").encode()


def error(type_: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": {"type": type_, "message": message}}


def flow_file(folder: str | os.PathLike) -> Path | None:
    """The flow's yaml in ``folder`` (dag or flex), or None."""
    for name in FLOW_FILES:
        path = Path(folder) / name
        if path.is_file():
            return path
    return None


def describe_exit(status: int) -> str:
    """A wait status as people say it: 'exited with code 1', 'killed by SIGKILL'."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"killed by {name}"
    if os.WIFEXITED(status):
        return f"exited with code {os.WEXITSTATUS(status)}"
    return f"ended with wait status {status}"


def write_json(path: str | os.PathLike, data: Mapping[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically (temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, default=str, indent=2) + "\n")
    os.replace(tmp, path)


def read_json(path: str | os.PathLike) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def socket_address(path: str | os.PathLike) -> Iterator[str]:
    """An AF_UNIX address for ``path``, even past sun_path's 108 bytes (via /proc/self/fd)."""
    path = os.fspath(path)
    if len(os.fsencode(path)) < _MAX_SUN_PATH:
        yield path
        return
    folder, name = os.path.split(os.path.abspath(path))
    fd = os.open(folder or "/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{name}"
    finally:
        os.close(fd)


def connect(path: str | os.PathLike, timeout: float | None = 10.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        with socket_address(path) as address:
            sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


class Connection:
    """One connection to a supervisor; requests on it are answered in order.

    >>> with Connection(path) as c:
    ...     c.request({"op": "ping"})["phase"]
    """

    def __init__(self, path: str | os.PathLike, timeout: float | None = 10.0):
        self.sock = connect(path, timeout)
        self._buf = bytearray()

    def request(self, payload: Mapping[str, Any], timeout: float | None = 10.0) -> dict[str, Any]:
        """Send one request, wait up to ``timeout`` seconds (None: forever) for its answer.

        Raises OSError (FileNotFoundError, ConnectionRefusedError, TimeoutError, ...) when the
        supervisor cannot be reached, ProtocolError when it hangs up without answering,
        AnswerTooLong when its answer is longer than the request's can be (``MAX_ANSWER``)."""
        limit = MAX_ANSWER.get(str(payload.get("op")), MAX_LINE)
        self.sock.settimeout(timeout)
        self.sock.sendall(encode(dict(payload)))
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buf:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no answer to {payload.get('op')!r} in {timeout} s")
                self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ProtocolError(f"the session closed the connection without answering "
                                    f"{payload.get('op')!r}")
            self._buf += chunk
            if len(self._buf) > limit and b"\n" not in self._buf[:limit + 1]:
                raise AnswerTooLong(f"the answer to {payload.get('op')!r} is longer than "
                                    f"{limit >> 20} MB")
        line, _, rest = bytes(self._buf).partition(b"\n")
        self._buf = bytearray(rest)
        return decode_answer(line)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def request(socket_path: str | os.PathLike, payload: Mapping[str, Any],
            timeout: float | None = 10.0) -> dict[str, Any]:
    """Connect, send one request, return its answer (see ``Connection.request``)."""
    with Connection(socket_path, timeout=timeout) as conn:
        return conn.request(payload, timeout=timeout)


def decode_answer(line: bytes) -> dict[str, Any]:
    """One answer line as a JSON object, or ProtocolError: the other side may be hostile (a
    session's code can answer in its supervisor's place), so anything else -- not JSON, too
    deeply nested to parse -- is the same clean error."""
    try:
        answer = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"the session answered something that is not JSON: "
                            f"{str(exc)[:200]}") from None
    if not isinstance(answer, dict):
        raise ProtocolError("the session's answer is not a JSON object")
    return answer


async def arequest(socket_path: str | os.PathLike, payload: Mapping[str, Any],
                   timeout: float = 10.0) -> dict[str, Any]:
    """``request`` for an event loop: no thread waits while the session takes its time, so a
    slow (or hostile) session holds up only its own callers. Raises what ``request`` raises
    (OSError, TimeoutError, ProtocolError)."""
    loop = asyncio.get_running_loop()
    limit = MAX_ANSWER.get(str(payload.get("op")), MAX_LINE)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    buf = bytearray()
    try:
        async with asyncio.timeout(timeout):
            with socket_address(socket_path) as address:
                await loop.sock_connect(sock, address)
            data = (encode(dict(payload)) if payload.get("op") not in _LARGE_OPS
                    else await asyncio.to_thread(encode, dict(payload)))  # a run's lines
            await loop.sock_sendall(sock, data)
            while True:
                chunk = await loop.sock_recv(sock, 1 << 20)
                if not chunk:
                    raise ProtocolError(f"the session closed the connection without "
                                        f"answering {payload.get('op')!r}")
                end = chunk.find(b"\n")
                if end >= 0:
                    buf += chunk[:end]
                    if len(buf) > limit:
                        raise AnswerTooLong(f"the answer to {payload.get('op')!r} is longer "
                                            f"than {limit >> 20} MB")
                    break
                buf += chunk
                if len(buf) > limit:
                    raise AnswerTooLong(f"the answer to {payload.get('op')!r} is longer than "
                                        f"{limit >> 20} MB")
    except TimeoutError:
        raise TimeoutError(f"no answer to {payload.get('op')!r} in {timeout} s") from None
    finally:
        sock.close()
    if len(buf) > 1 << 20:  # a large answer is parsed off the loop
        return await asyncio.to_thread(decode_answer, bytes(buf))
    return decode_answer(bytes(buf))

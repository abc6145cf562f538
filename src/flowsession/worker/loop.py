"""The supervisor's I/O: one thread, one selector. The Unix socket (bound 0600), client
connections (JSON lines, answered in order per connection), signals (through a wakeup
socket, so SIGCHLD and SIGTERM are handled in the loop, never inside a handler), and the
bookkeeping of activity that the idle timeout reads. Stdlib only.

``Server`` is the base of ``flowsession.worker.supervisor.Supervisor``, which supplies the
ops, the status, the timers and what to do when a child exits or a SIGTERM comes.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flowsession.worker.channel import Channel
from flowsession.worker.protocol import E_BAD_REQUEST, connect, error, socket_address

log = logging.getLogger("flowsession.supervisor")


class Exit(Exception):
    """Raised to leave the loop; ``serve`` returns its code."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


class BadRequest(ValueError):
    """An op raises it for a malformed request: answered as bad_request."""


@dataclass(eq=False)
class Client:
    channel: Channel
    inbox: deque = field(default_factory=deque)
    waiting: bool = False  # a request of this connection is not answered yet
    pumping: bool = False


@dataclass(eq=False)
class Request:
    """A non-ping request: activity until it is answered."""

    client: Client
    op: str
    msg: dict[str, Any]
    started: float = field(default_factory=time.monotonic)
    done: bool = False


class Server:
    def __init__(self, socket_path: str | None, listen_fd: int | None = None):
        self.socket_path = os.path.abspath(socket_path) if socket_path else None
        self.listen_fd = listen_fd
        self.sel = selectors.DefaultSelector()
        self.clients: dict[Channel, Client] = {}
        self.active: set[Request] = set()  # non-ping requests not answered yet
        self.last_activity: float | None = None  # when the last one was answered
        self._socket_ino: int | None = None

    # --- for the subclass --------------------------------------------------------------

    def ops(self) -> dict[str, Callable[[Request], None]]:
        raise NotImplementedError

    def status(self) -> dict[str, Any]:
        raise NotImplementedError

    def timeout(self) -> float:
        """Seconds until ``tick`` has something to do (at most 1)."""
        return 1.0

    def tick(self) -> None:
        """Runs after every wakeup of the loop."""

    def child_exited(self) -> None:
        """SIGCHLD came."""

    def terminate(self) -> None:
        """SIGTERM or SIGINT came."""
        raise Exit(0)

    def crashed(self, exc: BaseException) -> int:
        return 1

    # --- running -----------------------------------------------------------------------

    def start(self) -> None:
        """Install the signal handling and bind the socket (before anything slow)."""
        self._sig_r, self._sig_w = socket.socketpair()
        for s in (self._sig_r, self._sig_w):
            s.setblocking(False)
        signal.set_wakeup_fd(self._sig_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)  # the loop acts on the wakeup byte
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        self.sel.register(self._sig_r, selectors.EVENT_READ, self._on_signal)
        self._bind()

    def serve(self) -> int:
        try:
            while True:
                for key, mask in self.sel.select(self.timeout()):
                    key.data(mask)
                self.tick()
        except Exit as done:
            return done.code
        except BaseException as exc:  # a bug: the subclass leaves a reason behind
            log.exception("supervisor crashed")
            try:
                return self.crashed(exc)
            except Exit as done:
                return done.code

    def answer(self, req: Request, response: dict[str, Any]) -> None:
        if req.done:
            return
        req.done = True
        self.active.discard(req)
        self.last_activity = time.monotonic()
        req.client.waiting = False
        req.client.channel.send(response)
        self._pump(req.client)

    def close_in_child(self) -> None:
        """In a forked child: close every socket of ours without touching the selector's
        registrations (the epoll instance is shared with the parent)."""
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()
        self.sel.close()
        self._sig_w.close()

    def remove_socket(self) -> None:
        if self.socket_path is None:  # a listening socket we were handed: its owner removes it
            return
        try:
            if os.stat(self.socket_path).st_ino == self._socket_ino:
                os.unlink(self.socket_path)  # only ours, never a successor's
        except OSError:
            pass

    def flush_clients(self, timeout: float = 1.0) -> None:
        for ch in list(self.clients):
            ch.flush_blocking(timeout=timeout)

    # --- internals -----------------------------------------------------------------------

    def _bind(self) -> None:
        if self.listen_fd is not None:  # bound by whoever started us, where we cannot write
            self.listener = socket.socket(fileno=self.listen_fd)
            self.listener.setblocking(False)
            self.sel.register(self.listener, selectors.EVENT_READ, self._accept)
            log.info("supervisor %d listening on the socket it was handed", os.getpid())
            return
        path = self.socket_path
        if os.path.exists(path) or os.path.islink(path):
            try:
                connect(path, timeout=1.0).close()
            except OSError:
                os.unlink(path)  # stale: nobody answers on it
            else:
                raise SystemExit(f"another process answers on {path}; not starting")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket file is created 0600
        try:
            with socket_address(path) as address:
                self.listener.bind(address)
        finally:
            os.umask(old)
        self.listener.listen(64)
        self.listener.setblocking(False)
        self._socket_ino = os.stat(path).st_ino
        self.sel.register(self.listener, selectors.EVENT_READ, self._accept)
        log.info("supervisor %d listening on %s", os.getpid(), path)

    def _on_signal(self, _mask: int) -> None:
        try:
            data = self._sig_r.recv(4096)
        except BlockingIOError:
            return
        if signal.SIGCHLD in data:
            self.child_exited()
        if signal.SIGTERM in data or signal.SIGINT in data:
            self.terminate()

    def _accept(self, _mask: int) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                return
            ch = Channel(sock, self.sel, self._on_client_message, self._on_client_closed)
            self.clients[ch] = Client(ch)

    def _on_client_closed(self, ch: Channel) -> None:
        self.clients.pop(ch, None)  # its running requests go on; their answers are dropped

    def _on_client_message(self, ch: Channel, msg: dict[str, Any] | None) -> None:
        client = self.clients.get(ch)
        if client is not None:
            client.inbox.append(msg)
            self._pump(client)

    def _pump(self, client: Client) -> None:
        if client.pumping:  # answer() inside _handle: the outer loop goes on
            return
        client.pumping = True
        try:
            while client.inbox and not client.waiting and not client.channel.closed:
                self._handle(client, client.inbox.popleft())
        finally:
            client.pumping = False

    def _handle(self, client: Client, msg: dict[str, Any] | None) -> None:
        op = msg.get("op") if msg is not None else None
        if op == "ping":  # not activity
            client.channel.send(self.status())
            return
        ops = self.ops()
        handler = ops.get(op) if isinstance(op, str) else None
        if handler is None:
            what = f"unknown op {op!r}" if msg is not None else "a request is one JSON object"
            client.channel.send(error(E_BAD_REQUEST, f"{what}; ops: ping, {', '.join(ops)}"))
            return
        req = Request(client, op, msg)
        self.active.add(req)
        client.waiting = True
        try:
            handler(req)
        except BadRequest as exc:
            self.answer(req, error(E_BAD_REQUEST, str(exc)))


def number(msg: dict[str, Any], key: str, default: float) -> float:
    """``msg[key]`` as seconds (or a count), ``default`` when absent."""
    value = msg.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"'{key}' must be a number of seconds")
    return float(value)

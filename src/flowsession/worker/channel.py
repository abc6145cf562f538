"""A non-blocking socket carrying JSON lines, driven by a selector (the supervisor's side of
client connections and of worker socketpairs). Stdlib only."""

from __future__ import annotations

import json
import selectors
import socket
from collections.abc import Callable
from typing import Any

from flowsession.worker.protocol import MAX_LINE, encode


class Channel:
    """Reads JSON lines into ``on_message(channel, obj)``; ``send`` queues a line and writes
    what the socket takes now, the rest when it is writable. ``on_close(channel)`` runs once,
    on EOF, on an error, or on ``close()``. A line that is not a JSON object is passed on as
    ``None`` (the supervisor answers it with bad_request)."""

    def __init__(self, sock: socket.socket, sel: selectors.BaseSelector,
                 on_message: Callable[[Channel, dict[str, Any] | None], None],
                 on_close: Callable[[Channel], None]):
        sock.setblocking(False)
        self.sock, self.sel = sock, sel
        self.on_message, self.on_close = on_message, on_close
        self._rbuf = bytearray()
        self._wbuf = bytearray()
        self.closed = False
        self.closing = False  # close once everything queued is written
        self._events = selectors.EVENT_READ
        sel.register(sock, self._events, self.handle)

    def fileno(self) -> int:
        return self.sock.fileno()

    def handle(self, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush()
        if mask & selectors.EVENT_READ and not self.closed:
            self._read()

    def send(self, obj: Any) -> None:
        if self.closed:
            return
        self._wbuf += encode(obj)
        self._flush()

    def close_after_flush(self) -> None:
        self.closing = True
        if not self._wbuf:
            self.close()

    def flush_blocking(self, timeout: float = 1.0) -> None:
        """Write what is queued, waiting up to ``timeout`` (used just before exiting)."""
        if self.closed or not self._wbuf:
            return
        try:
            self.sock.settimeout(timeout)
            self.sock.sendall(self._wbuf)
            self._wbuf.clear()
        except OSError:
            pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.sel.unregister(self.sock)
        except (KeyError, ValueError):
            pass
        self.sock.close()
        self.on_close(self)

    def drain(self) -> None:
        """Pass on what the peer wrote before it went away (a dead worker's last messages),
        then close."""
        while not self.closed and self._read():
            pass
        self.close()

    # --- internals -------------------------------------------------------------------------

    def _read(self) -> bool:
        """One read; False when there was nothing to read yet."""
        try:
            chunk = self.sock.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            self.close()
            return True
        if not chunk:
            self.close()
            return True
        self._rbuf += chunk
        while not self.closed:
            end = self._rbuf.find(b"\n")
            if end < 0:
                if len(self._rbuf) > MAX_LINE:
                    self.close()
                return True
            line = bytes(self._rbuf[:end])
            del self._rbuf[:end + 1]
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                obj = None
            self.on_message(self, obj if isinstance(obj, dict) else None)
        return True

    def _flush(self) -> None:
        while self._wbuf and not self.closed:
            try:
                sent = self.sock.send(self._wbuf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # the peer went away: what it does not read is lost
                self._wbuf.clear()
                self.close()
                return
            del self._wbuf[:sent]
        if self.closed:
            return
        if not self._wbuf and self.closing:
            self.close()
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self._wbuf else 0)
        if events != self._events:
            self._events = events
            self.sel.modify(self.sock, events, self.handle)

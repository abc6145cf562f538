"""Lines in flight in one batch worker, adapted to the endpoint: a gate of ``slots`` lines that
shrinks (x0.7) on a rate limit (HTTP 429) and grows back by one line per window of successes (AIMD),
and holds new lines back while the endpoint's ``retry-after`` runs. Stdlib only.

The 429s are seen where every OpenAI call passes: ``httpx``'s (or ``httpx2``'s) ``send`` (the
``openai`` client sends each attempt, its own retries included, through it). ``watch_http`` wraps
it once per worker process; without httpx nothing is watched and the gate stays at ``slots``.

While the gate is below its setting the same ``send`` also paces the *requests*: at most
``limit`` at once and none before ``retry-after`` has passed. Lines already in flight retry on
their own (promptflow's llm tool sleeps the retry-after, then tries again, up to 100 times):
without pacing, every line told "retry in 20 ms" came back at once, one got the free answer and
the others were refused again, burning the worker's CPU on refusals. A request waits for a slot
at most ``SLOT_WAIT_S`` (one that never answers must not hold the others back for good).
"""

from __future__ import annotations

import asyncio
import importlib
import threading
import time
from collections.abc import Callable
from typing import Any

MAX_PAUSE_S = 60.0  # a retry-after longer than this is taken as this
CUT_EVERY_S = 1.0  # at most one halving per second: one burst of 429s is one signal
DEFAULT_PAUSE_S = 1.0  # a 429 without retry-after holds new lines back this long
DECREASE = 0.7  # a rate limit multiplies the lines in flight by this (halving lost ~10% of R)
SLOT_WAIT_S = 2.0  # while throttled, a request waits at most this long for a request slot


class Gate:
    """At most ``limit`` lines in flight (1 <= limit <= slots)."""

    def __init__(self, slots: int, clock: Callable[[], float] = time.monotonic):
        self.slots = max(1, int(slots))
        self.limit = float(self.slots)
        self.inflight = 0
        self.clock = clock
        self.paused_until = 0.0
        self.last_cut = -1e9
        self.throttled = 0  # 429s seen
        self.lowest = self.slots  # the lowest limit reached
        self.requests = 0  # HTTP requests in flight (counted while throttled)
        self.cv = threading.Condition()

    def enter(self) -> None:
        """Wait for a free slot (and for a retry-after to pass)."""
        with self.cv:
            while True:
                wait = self.paused_until - self.clock()
                if wait <= 0 and self.inflight < int(self.limit):
                    self.inflight += 1
                    return
                self.cv.wait(timeout=wait if wait > 0 else None)

    def leave(self, *, ok: bool = True) -> None:
        """A line ended (or timed out: its slot is free even if its thread is stuck)."""
        with self.cv:
            self.inflight = max(0, self.inflight - 1)
            if ok and self.limit < self.slots and self.clock() - self.last_cut > CUT_EVERY_S:
                self.limit = min(float(self.slots), self.limit + 1.0 / self.limit)
            self.cv.notify_all()  # line and request waiters share the condition

    def pacing(self) -> bool:
        """Are requests paced now (a rate limit seen, the gate not yet back to its setting)?"""
        return self.limit < self.slots

    def request_enter(self, slot_wait: float = SLOT_WAIT_S) -> None:
        """Before an HTTP request, while pacing: wait for the endpoint's retry-after to pass
        and for one of ``limit`` request slots (at most ``slot_wait`` for the slot). Always
        counts the request in: call ``request_leave`` after it."""
        with self.cv:
            give_up = self.clock() + slot_wait
            while self.pacing():
                now = self.clock()
                pause = self.paused_until - now
                if pause <= 0 and (self.requests < int(self.limit) or now >= give_up):
                    break
                self.cv.wait(timeout=pause if pause > 0 else give_up - now)
            self.requests += 1

    def request_leave(self) -> None:
        with self.cv:
            self.requests = max(0, self.requests - 1)
            self.cv.notify_all()

    def rate_limited(self, retry_after: float | None) -> None:
        """The endpoint answered 429: fewer lines in flight, new ones paused."""
        with self.cv:
            now = self.clock()
            self.throttled += 1
            pause = DEFAULT_PAUSE_S if retry_after is None else retry_after
            self.paused_until = max(self.paused_until, now + min(max(pause, 0.0), MAX_PAUSE_S))
            if now - self.last_cut >= CUT_EVERY_S:
                self.limit = max(1.0, self.limit * DECREASE)
                self.last_cut = now
                self.lowest = min(self.lowest, int(self.limit))

    def report(self) -> dict[str, Any]:
        with self.cv:
            return {"throttled": self.throttled, "limit": int(self.limit),
                    "lowest": self.lowest}


def retry_after_of(headers: Any) -> float | None:
    """Seconds from ``retry-after-ms`` / ``retry-after`` (seconds; an HTTP date is ignored)."""
    try:
        ms = headers.get("retry-after-ms")
        if ms is not None:
            return float(ms) / 1000
        value = headers.get("retry-after")
        return None if value is None else float(value)
    except (TypeError, ValueError, AttributeError):
        return None


_gates: list[Gate] = []
_patched: set[str] = set()
HTTP_MODULES = ("httpx", "httpx2")  # openai's client: httpx, or its successor httpx2


def watch_http(gate: Gate) -> bool:
    """Tell ``gate`` of every 429 answered to httpx (or httpx2) in this process, and let it
    pace the requests while it is throttled; False when neither is installed."""
    _gates.append(gate)
    for name in HTTP_MODULES:
        if name in _patched:
            continue
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        _patch(module)
        _patched.add(name)
    return bool(_patched)


def _seen(response: Any) -> None:
    if getattr(response, "status_code", None) == 429:
        after = retry_after_of(getattr(response, "headers", None))
        for gate in list(_gates):
            gate.rate_limited(after)


def _patch(module: Any) -> None:
    sync_send, async_send = module.Client.send, module.AsyncClient.send

    def send(self: Any, *args: Any, **kwargs: Any) -> Any:
        paced = [g for g in list(_gates) if g.pacing()]
        for gate in paced:
            gate.request_enter()
        try:
            response = sync_send(self, *args, **kwargs)
        finally:
            for gate in paced:
                gate.request_leave()
        _seen(response)
        return response

    async def asend(self: Any, *args: Any, **kwargs: Any) -> Any:
        paced = [g for g in list(_gates) if g.pacing()]
        for gate in paced:  # waits on a thread: the event loop goes on
            await asyncio.to_thread(gate.request_enter)
        try:
            response = await async_send(self, *args, **kwargs)
        finally:
            for gate in paced:
                gate.request_leave()
        _seen(response)
        return response

    module.Client.send, module.AsyncClient.send = send, asend

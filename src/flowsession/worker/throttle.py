"""Lines in flight in one batch worker, adapted to the endpoint: a gate of ``slots`` lines that
shrinks (x0.7) on a rate limit (HTTP 429) and grows back by one line per window of successes (AIMD),
and holds new lines back while the endpoint's ``retry-after`` runs. Stdlib only.

The 429s are seen where every OpenAI call passes: ``httpx``'s (or ``httpx2``'s) ``send`` (the
``openai`` client sends each attempt, its own retries included, through it). ``watch_http`` wraps
it once per worker process; without httpx nothing is watched and the gate stays at ``slots``.

Once the endpoint has said 429 the same ``send`` also paces the *requests* (lines in flight
retry on their own: promptflow's llm tool sleeps the retry-after and tries again, up to 100
times; unpaced, every line told "retry in 20 ms" came back at once, one got the free answer and
the others were refused again, ten refusals an answer, each costing the worker CPU). Requests
leave one per ``spacing`` seconds: the first retry-after (a token bucket's time to its next
answer), x1/0.7 on a further 429 (at most once per spacing), x0.9 on each answer, until the
spacing is under a millisecond and pacing stops. Several workers pacing alike share the
endpoint as TCP flows share a link.
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
SPEED_UP = 0.9  # each answer while pacing multiplies the spacing of requests by this
MIN_SPACING_S = 0.001  # below this the requests are not paced any more


class Gate:
    """At most ``limit`` lines in flight (1 <= limit <= slots); once a 429 is seen, one
    request per ``spacing`` seconds until the endpoint keeps answering."""

    def __init__(self, slots: int, clock: Callable[[], float] = time.monotonic):
        self.slots = max(1, int(slots))
        self.limit = float(self.slots)
        self.inflight = 0
        self.clock = clock
        self.paused_until = 0.0
        self.last_cut = -1e9
        self.throttled = 0  # 429s seen
        self.lowest = self.slots  # the lowest limit reached
        self.spacing = 0.0  # seconds between requests while pacing (0: not pacing)
        self.next_send = 0.0  # when the next paced request may leave
        self.last_slowed = -1e9
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
            self.cv.notify()

    def pacing(self) -> bool:
        """Are requests paced now?"""
        return self.spacing > 0

    def request_enter(self) -> None:
        """Before an HTTP request, while pacing: wait for this request's turn (one per
        ``spacing``, none before the endpoint's retry-after has passed)."""
        with self.cv:
            if not self.spacing:
                return
            now = self.clock()
            depart = max(now, self.paused_until, self.next_send)
            self.next_send = depart + self.spacing
        while (wait := depart - self.clock()) > 0:
            time.sleep(min(wait, MAX_PAUSE_S))

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
            if not self.spacing:
                self.spacing = min(max(pause, MIN_SPACING_S), MAX_PAUSE_S)
                self.last_slowed = now
            elif now - self.last_slowed >= self.spacing:
                self.spacing = min(self.spacing / DECREASE, MAX_PAUSE_S)
                self.last_slowed = now

    def answered(self) -> None:
        """The endpoint answered (not 429): paced requests may leave a little sooner."""
        if self.spacing:
            with self.cv:
                self.spacing *= SPEED_UP
                if self.spacing < MIN_SPACING_S:
                    self.spacing = 0.0

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
    else:
        for gate in list(_gates):
            gate.answered()


def _patch(module: Any) -> None:
    sync_send, async_send = module.Client.send, module.AsyncClient.send

    def send(self: Any, *args: Any, **kwargs: Any) -> Any:
        for gate in [g for g in list(_gates) if g.pacing()]:
            gate.request_enter()
        response = sync_send(self, *args, **kwargs)
        _seen(response)
        return response

    async def asend(self: Any, *args: Any, **kwargs: Any) -> Any:
        for gate in [g for g in list(_gates) if g.pacing()]:  # on a thread: the loop goes on
            await asyncio.to_thread(gate.request_enter)
        response = await async_send(self, *args, **kwargs)
        _seen(response)
        return response

    module.Client.send, module.AsyncClient.send = send, asend

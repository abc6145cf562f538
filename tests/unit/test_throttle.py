"""The lines-in-flight gate of a batch worker: shrinks on a 429, waits out retry-after, grows
back one line per window of successes (a fake clock; no threads needed)."""

from __future__ import annotations

import threading
import time

from flowsession.worker.throttle import Gate, retry_after_of


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_429_cuts_the_lines_in_flight_and_successes_bring_them_back():
    clock = Clock()
    gate = Gate(20, clock=clock)
    gate.rate_limited(0.5)
    assert gate.report() == {"throttled": 1, "limit": 14, "lowest": 14}
    gate.rate_limited(0.5)  # the same burst of 429s: one signal
    assert gate.report()["limit"] == 14
    clock.now += 1.5
    gate.rate_limited(None)
    assert gate.report()["limit"] == 9
    clock.now += 2
    for _ in range(200):
        gate.inflight = 1
        gate.leave(ok=True)
    assert gate.report()["limit"] == 20  # never above the setting


def test_new_lines_wait_out_the_retry_after_and_never_go_below_one():
    clock = Clock()
    gate = Gate(2, clock=clock)
    for _ in range(5):
        clock.now += 2
        gate.rate_limited(3)
    assert gate.report()["limit"] == 1
    assert gate.paused_until == clock.now + 3
    clock.now += 3.01
    gate.enter()  # free now: returns at once
    assert gate.inflight == 1


def test_retry_after_headers():
    assert retry_after_of({"retry-after-ms": "250"}) == 0.25
    assert retry_after_of({"retry-after": "2"}) == 2.0
    assert retry_after_of({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) is None
    assert retry_after_of({}) is None


def test_requests_are_not_paced_until_the_endpoint_says_429():
    gate = Gate(3)
    for _ in range(10):  # a line may send many requests at once: none waits
        gate.request_enter()
    assert gate.requests == 10 and not gate.pacing()


def test_while_throttled_at_most_limit_requests_go_and_the_next_waits_for_one_to_end():
    gate = Gate(20)
    gate.rate_limited(0.0)  # limit 14, no pause
    for _ in range(14):
        gate.request_enter()
    entered = threading.Event()

    def fifteenth():
        gate.request_enter(slot_wait=60)
        entered.set()

    t = threading.Thread(target=fifteenth)
    t.start()
    assert not entered.wait(0.3)  # held while 14 are in flight
    gate.request_leave()
    assert entered.wait(10)
    t.join()
    assert gate.requests == 14


def test_a_request_waits_out_the_retry_after_and_never_waits_for_a_slot_for_ever():
    gate = Gate(4)
    gate.rate_limited(0.2)  # limit 2; nothing before the retry-after
    gate.request_enter()
    assert time.monotonic() >= gate.paused_until
    gate.request_enter()
    gate.request_enter(slot_wait=0.05)  # no slot free: goes after waiting its share
    assert gate.requests == 3

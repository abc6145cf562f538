"""The lines-in-flight gate of a batch worker: shrinks on a 429, waits out retry-after, grows
back one line per window of successes (a fake clock; no threads needed)."""

from __future__ import annotations

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
    clock = Clock()
    gate = Gate(3, clock=clock)
    for _ in range(10):  # a line may send many requests at once: none waits
        gate.request_enter()
    assert not gate.pacing() and gate.next_send == 0.0


def test_after_a_429_requests_leave_one_per_spacing_after_the_retry_after():
    clock = Clock()
    gate = Gate(20, clock=clock)
    gate.rate_limited(0.05)  # the token bucket's next answer in 50 ms
    assert gate.pacing() and gate.spacing == 0.05
    departures = []
    for _ in range(4):  # each request's turn (the fake clock moved there, as a sleep would)
        clock.now = max(clock.now, gate.next_send, gate.paused_until)
        departures.append(clock.now)
        gate.request_enter()
    assert [round(d - departures[0], 3) for d in departures] == [0.0, 0.05, 0.1, 0.15]
    assert departures[0] == 100.05  # not before the retry-after


def test_the_spacing_grows_on_more_429s_and_shrinks_with_answers_until_pacing_stops():
    clock = Clock()
    gate = Gate(20, clock=clock)
    gate.rate_limited(0.1)
    gate.rate_limited(0.1)  # the same moment: one signal
    assert gate.spacing == 0.1
    clock.now += 0.2
    gate.rate_limited(0.1)
    assert round(gate.spacing, 4) == round(0.1 / 0.7, 4)
    for _ in range(100):
        gate.answered()
    assert not gate.pacing()  # the endpoint keeps answering: no pacing any more


def test_a_paced_request_really_waits_its_turn():
    gate = Gate(4)
    gate.rate_limited(0.2)
    gate.request_enter()
    assert time.monotonic() >= gate.paused_until  # after the retry-after

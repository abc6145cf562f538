"""How often an active run is looked at: its end is seen at once when its last lines are in
flight, without looking at a long run many times a second."""

from __future__ import annotations

from flowsession.runs.model import NEAR_END_LOOK_S, Run, RunStatus


def a_run(done: int, *, total: int = 1000, status=RunStatus.RUNNING, **spec) -> Run:
    return Run(name="r", owner="ada", flow="f", display_name="r", description="", tags={},
               status=status, spec=spec, session_id="s", total=total, completed=done - 2,
               failed=2, errors=[], error=None, operator=None, created_at=0.0,
               started_at=0.0, ended_at=None)


def test_a_long_run_is_looked_at_at_the_usual_pace_until_its_last_lines_are_in_flight():
    assert a_run(500).look_again_s(0.2) == 0.2
    assert a_run(935).look_again_s(0.2) == 0.2  # 65 left: more than the 64 in flight
    assert a_run(936).look_again_s(0.2) == NEAR_END_LOOK_S < 0.2


def test_the_run_s_own_lines_in_flight_decide_when_its_end_is_near():
    assert a_run(990, max_concurrency=8).look_again_s(0.2) == 0.2
    assert a_run(992, max_concurrency=8).look_again_s(0.2) == NEAR_END_LOOK_S


def test_a_run_not_yet_running_is_looked_at_at_the_usual_pace():
    assert a_run(0, total=10, status=RunStatus.PREPARING).look_again_s(0.25) == 0.25

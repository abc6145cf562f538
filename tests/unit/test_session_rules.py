"""The pure rules of sessions and computes: states, the idle rule, VM sizes and the quota."""

from __future__ import annotations

import pytest

from flowsession.computes import sizes
from flowsession.config import format_duration, parse_duration
from flowsession.errors import InvalidInput, QuotaExceeded
from flowsession.sessions.state import (
    BUSY,
    TRANSITIONS,
    IdleView,
    SessionState as S,
    can_transition,
    should_stop,
)


def test_every_state_can_reach_stopped_except_stopped_itself():
    for state in S:
        if state is S.STOPPED:
            assert TRANSITIONS[state] == frozenset()
            continue
        seen, todo = set(), [state]
        while todo:
            for nxt in TRANSITIONS[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        assert S.STOPPED in seen, state


def test_a_failed_session_recovers_only_by_reset_or_stop():
    assert TRANSITIONS[S.FAILED] == {S.RESETTING, S.STOPPING}
    assert not can_transition(S.FAILED, S.RUNNING)


def test_an_install_returns_to_running_whether_it_worked_or_not():
    assert can_transition(S.RUNNING, S.INSTALLING)
    assert can_transition(S.INSTALLING, S.RUNNING)
    assert can_transition(S.INSTALLING, S.STOPPING)  # a stop may come during an install


def test_an_idle_running_session_is_stopped_after_its_idle_time():
    view = IdleView(S.RUNNING, last_activity_at=1000.0, idle_timeout_s=600)
    assert not should_stop(view, now=1599.0)
    assert should_stop(view, now=1600.0)


def test_a_busy_session_is_never_culled():
    long_run = IdleView(S.RUNNING, last_activity_at=0.0, idle_timeout_s=60, lines_running=1)
    assert not should_stop(long_run, now=10**9)
    for state in BUSY:
        assert not should_stop(IdleView(state, 0.0, 60), now=10**9)


def test_an_idle_time_of_zero_means_never():
    assert not should_stop(IdleView(S.RUNNING, 0.0, 0), now=10**9)


def test_the_catalog_has_plain_and_azure_names():
    catalog = sizes.load_catalog()
    assert {"small", "medium", "large", "Standard_D2s_v3", "Standard_E4s_v3"} <= set(catalog)
    assert sizes.lookup(catalog, "standard_d2s_v3").name == "Standard_D2s_v3"
    with pytest.raises(InvalidInput, match="Standard_NC24") as exc:
        sizes.lookup(catalog, "Standard_NC24")
    assert "flowsession compute sizes" in exc.value.hint


def test_the_default_start_picks_a_size_that_fits_the_quota():
    catalog = sizes.load_catalog()
    assert sizes.pick_default(catalog, "medium", quota=16, in_use=0).name == "medium"
    assert sizes.pick_default(catalog, "medium", quota=16, in_use=15).name == "small"
    with pytest.raises(QuotaExceeded) as exc:
        sizes.pick_default(catalog, "medium", quota=16, in_use=16)
    assert "16 in use" in str(exc.value)


def test_a_size_over_the_quota_is_refused_with_what_is_used_and_free():
    size = sizes.lookup(sizes.load_catalog(), "Standard_D8s_v3")
    with pytest.raises(QuotaExceeded) as exc:
        sizes.check_fits(size, quota=10, in_use=4)
    assert "needs 8 vCPU" in str(exc.value) and "only 6" in str(exc.value)
    assert "4 in use" in str(exc.value)


def test_a_custom_catalog_file_is_read_and_checked(tmp_path):
    good = tmp_path / "sizes.toml"
    good.write_text('[tiny]\nvcpu = 0.5\nmemory_gb = 0.5\n')
    assert sizes.load_catalog(good)["tiny"].memory_bytes == 500_000_000
    bad = tmp_path / "bad.toml"
    bad.write_text('[tiny]\nvcpu = "lots"\n')
    with pytest.raises(InvalidInput, match="tiny"):
        sizes.load_catalog(bad)


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("30m", 1800), ("2h", 7200),
                                                ("1d", 86400), ("45", 2700), ("1.5h", 5400)])
def test_durations_read_like_idle_times(text, seconds):
    assert parse_duration(text) == seconds


def test_a_bad_duration_names_the_option():
    with pytest.raises(InvalidInput, match="--idle-time"):
        parse_duration("soon", name="--idle-time")


def test_durations_print_back_simply():
    assert (format_duration(3600), format_duration(90), format_duration(0)) == ("1h", "90s",
                                                                                 "never")

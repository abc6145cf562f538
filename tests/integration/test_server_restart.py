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


def test_operations_in_flight_end_after_a_server_restart(tmp_path, images_dir, index):
    home = tmp_path / "home"
    server = Server(home, images_dir, index.url)
    try:
        h = {"Authorization": f"Bearer {server.token}"}
        api = httpx.Client(base_url=server.url, headers=h, timeout=60)
        assert api.post("/api/flows", json={"name": "sleepy", "files": _files("sleepy")}
                        ).status_code == 201
        assert api.post("/api/flows", json={"name": "echo", "files": _files("echo")}
                        ).status_code == 201
        lines = [{"seconds": "0.5"} for _ in range(12)]  # ~3 s on 2 workers
        r = api.post("/api/runs", json={"flow": "sleepy", "data_lines": lines, "workers": 2})
        assert r.status_code == 202, r.text
        run, run_op = r.json()["run"]["name"], r.json()["operation"]["id"]
        start_op = api.post("/api/flows/echo/session").json()["id"]  # a start in flight

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
        start = ops[start_op]
        if start["status"] == "failed":  # killed before the start ended: the reason is given
            assert "server restarted" in start["error"]["message"]
        # whatever the start's fate, the session's state settles (the sweep reconciles it)
        state = api.get("/api/flows/echo/session")
        assert state.status_code in (200, 404)
        if state.status_code == 200:
            assert state.json()["state"] in ("RUNNING", "STOPPED", "FAILED")
    finally:
        server.stop()
        for pid in procs.with_argument_under(str(Settings(home=home).runtime_dir)):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

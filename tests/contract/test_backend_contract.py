"""The compute backend contract, on every backend: sessions start, answer, report, end by
themselves, stop, and are found again from their stored handle; runs travel as data and come
back as data, validated, each line stored once."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import pytest
from helpers.backends import FLOWS, Lab
from helpers.flows import make_flow, run

from flowsession.backends.compute import registry
from flowsession.backends.compute.base import BackendState, RunWork, SessionHandle
from flowsession.errors import LineFailed

pytestmark = pytest.mark.timeout(420)


def flow_copy(tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(FLOWS / name, tmp_path / name))


def lines(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def work(run_id: str, rows: list[dict], *, workers: int = 2, **kw) -> RunWork:
    return RunWork(run_id=run_id, inputs=lines(rows), lines=None, workers=workers,
                   line_timeout=60.0, **kw)


async def collect_all(lab: Lab, handle: SessionHandle | None, run_id: str, total: int,
                      cursor: dict | None = None) -> tuple[dict[int, dict], int, dict]:
    """Every record the backend hands over (the first of each position kept, as the run's
    files keep them), how many it refused, and the cursor after."""
    got: dict[int, dict] = {}
    refused, cursor = 0, dict(cursor or {})
    while True:
        c = await lab.backend.collect(handle, run_id, cursor, total=total)
        for raw in c.records:
            rec = json.loads(raw)
            got.setdefault(rec["i"], rec)
        refused += c.refused
        cursor = c.cursor
        if not c.more:
            return got, refused, cursor


# --- a session's life -----------------------------------------------------------------------


def test_a_session_starts_answers_lines_and_shows_its_status_and_log(lab, tmp_path):
    async def go():
        flow = flow_copy(tmp_path, "echo")
        compute = await lab.compute()
        handle = await lab.start(flow, compute=compute)
        assert handle.backend == lab.name and handle.session_id.startswith("ses-")
        from flowsession.backends.compute import sandbox

        assert handle.sandboxed == (sandbox.bwrap_path() is not None)  # bubblewrap where it is
        # held to its VM size where it runs (cgroups where the host allows, else rlimits)
        assert "cgroup" in handle.limits_detail or "rlimit" in handle.limits_detail
        if "cgroup" in handle.limits_detail:  # the tests' nodes are this machine
            groups = Path(f"/proc/{handle.pid}/cgroup").read_text()
            assert f"/flowsession/{compute.compute_id}" in groups
        assert await lab.backend.test_line(handle, {"text": "hi"}, timeout=60) == {"out": "hi"}
        status = await lab.backend.status(handle)
        assert status.state == BackendState.RUNNING and not status.failed
        assert lab.backend.alive(handle)
        assert "ready" in await lab.backend.logs(handle)
        bad = flow_copy(tmp_path, "raises")
        failing = await lab.start(bad)
        with pytest.raises(LineFailed):
            await lab.backend.test_line(failing, {"text": "bad x"}, timeout=60)
        assert (await lab.backend.status(failing)).state == BackendState.RUNNING
        # a changed flow is loaded by fresh workers
        (flow / "echo.py").write_text(
            "from promptflow.core import tool\n\n\n@tool\ndef echo(text: str) -> str:\n"
            "    return text.upper()\n")
        snapshot = lab.envs.snapshot(flow)
        await lab.backend.reload(handle, snapshot.path)
        assert await lab.backend.test_line(handle, {"text": "hi"}, timeout=60) == {"out": "HI"}
        await lab.backend.configure(handle, idle_timeout_s=1234)

    run(go())


def test_stopping_twice_is_fine_and_the_session_is_gone(lab, tmp_path):
    async def go():
        handle = await lab.start(flow_copy(tmp_path, "echo"))
        await lab.backend.stop_session(handle, reason="by the test")
        await lab.backend.stop_session(handle, reason="again")
        assert not lab.backend.alive(handle)
        assert (await lab.backend.status(handle)).state in (BackendState.EXITED,
                                                             BackendState.LOST)
        assert "by the test" in await lab.backend.logs(handle)  # the end of its log is kept

    run(go())


def test_a_new_backend_object_reattaches_from_the_stored_handle(lab, tmp_path):
    async def go():
        handle = await lab.start(flow_copy(tmp_path, "echo"))
        stored = handle.json_text()
        fresh = registry.create(lab.settings)  # a restarted control plane
        again = SessionHandle.from_json(json.loads(stored))
        assert again == handle
        assert await fresh.test_line(again, {"text": "back"}, timeout=60) == {"out": "back"}
        assert (await fresh.status(again)).state == BackendState.RUNNING
        await fresh.stop_session(again, reason="stopped by the new control plane")
        assert not fresh.alive(again)

    run(go())


def test_an_idle_session_ends_itself_and_says_why(lab, tmp_path):
    async def go():
        handle = await lab.start(flow_copy(tmp_path, "echo"), idle=2)
        deadline = time.monotonic() + 60
        while (status := await lab.backend.status(handle)).state != BackendState.EXITED:
            assert time.monotonic() < deadline, status
            await asyncio.sleep(0.5)
        assert "idle for" in status.detail and "ended itself" in status.detail
        assert not lab.backend.alive(handle)
        await lab.backend.stop_session(handle, reason="the reconciler saw it end")
        assert "idle" in await lab.backend.logs(handle)

    run(go())


def test_a_standby_is_adopted_where_its_compute_runs_sessions(lab, tmp_path):
    async def go():
        flow = flow_copy(tmp_path, "echo")
        compute = await lab.compute()
        standby = await lab.standby(flow, compute=compute)
        handle = await lab.start(flow, compute=compute, standby=standby)
        assert handle.slot == standby.slot  # the same supervisor, adopted
        assert await lab.backend.test_line(handle, {"text": "x"}, timeout=60) == {"out": "x"}

    run(go())


def test_orphans_are_the_sessions_no_record_refers_to(lab, tmp_path):
    async def go():
        standby = await lab.standby(flow_copy(tmp_path, "echo"))
        deadline = time.monotonic() + 5  # found by the sweep that follows, if not this one
        while standby.slot not in {h.slot for h in lab.backend.orphans(set())}:
            assert time.monotonic() < deadline, "the unrecorded standby is not an orphan"
            await asyncio.sleep(0.2)
        assert standby.slot not in {h.slot for h in lab.backend.orphans({standby.slot})}
        for orphan in lab.backend.orphans({h.slot for h in lab.handles} - {standby.slot}):
            if orphan.slot == standby.slot:
                await lab.backend.stop_session(orphan, reason="orphaned")
        assert not lab.backend.alive(standby)

    run(go())


# --- runs -------------------------------------------------------------------------------------


def test_a_run_travels_as_data_and_each_record_comes_back_once(lab, tmp_path):
    async def go():
        handle = await lab.start(flow_copy(tmp_path, "echo"))
        rows = [{"text": f"line {i}"} for i in range(40)]
        progress = await lab.backend.submit_run(handle, work("r-once", rows))
        assert progress["state"] in ("loading", "running", "completed")
        # submitted again while it runs: the same run, answered with its status
        again = await lab.backend.submit_run(handle, work("r-once", rows))
        assert again["total"] == 40
        status = await lab.wait_run(handle, "r-once")
        assert (status["done"], status["failed"]) == (40, 0)
        got, refused, cursor = await collect_all(lab, handle, "r-once", 40)
        assert refused == 0 and sorted(got) == list(range(40))
        assert all(got[i]["output"] == {"out": f"line {i}"} for i in range(40))
        # nothing new past the cursor: no record is handed over twice
        more, _, _ = await collect_all(lab, handle, "r-once", 40, cursor)
        assert more == {}
        # only the lines asked for run (a resubmission of what has no stored result)
        part = RunWork(run_id="r-part", inputs=lines(rows), lines=(3, 5, 7), workers=1,
                       line_timeout=60.0)
        await lab.backend.submit_run(handle, part)
        await lab.wait_run(handle, "r-part")
        got, _, _ = await collect_all(lab, handle, "r-part", 40)
        assert sorted(got) == [3, 5, 7]
        await lab.backend.forget_run(handle, "r-once")
        assert await lab.backend.run_status(handle, "r-once") is None

    run(go())


def test_a_canceled_run_stops_and_keeps_what_it_did(lab, tmp_path):
    async def go():
        handle = await lab.start(flow_copy(tmp_path, "sleepy"))
        rows = [{"seconds": "0.5"} for _ in range(40)]
        await lab.backend.submit_run(handle, work("r-cancel", rows, workers=1))
        await lab.wait_run(handle, "r-cancel", states=("running",))
        await asyncio.sleep(1.5)
        await lab.backend.cancel_run(handle, "r-cancel")
        status = await lab.wait_run(handle, "r-cancel", states=("canceled",), timeout=30)
        got, _, _ = await collect_all(lab, handle, "r-cancel", 40)
        assert 0 < len(got) < 40 and status["done"] < 40

    run(go())


def test_the_aggregation_runs_over_the_stored_records(lab, tmp_path):
    async def go():
        flow = flow_copy(tmp_path, "aggregate")
        handle = await lab.start(flow)
        rows = [json.loads(x) for x in (flow / "data.jsonl").read_text().splitlines()]
        w = work("r-agg", rows)
        await lab.backend.submit_run(handle, w)
        await lab.wait_run(handle, "r-agg")
        got, _, _ = await collect_all(lab, handle, "r-agg", len(rows))
        records = b"".join(json.dumps(got[i]).encode() + b"\n" for i in sorted(got))
        out = await lab.backend.aggregate_run(handle, w, records)
        assert out == {"aggregated": True, "metrics": {"accuracy": 0.75}, "error": None}

    run(go())


HOSTILE = '''import glob
import os

from promptflow.core import tool


@tool
def echo(text: str) -> str:
    forged = [b'{"i": 1000000, "ok": true, "output": {"out": "out of range"}}',
              b'{"i": 0, "ok": "yes", "output": {"out": "not a bool"}}',
              b'{"i": 1, "ok": true, "output": "not an object"}',
              b'{"i": -1, "ok": true, "output": {}}',
              b'not json at all']
    for run in glob.glob(os.path.join(os.environ["HOME"], "..", "state", "runs", "*")):
        with open(os.path.join(run, "results.forged.jsonl"), "ab") as f:
            f.write(b"\\n".join(forged) + b"\\n")
    return text
'''


def test_records_that_are_not_valid_data_are_refused(lab, tmp_path):
    async def go():
        flow = flow_copy(tmp_path, "echo")
        (flow / "echo.py").write_text(HOSTILE)
        handle = await lab.start(flow)
        rows = [{"text": f"t{i}"} for i in range(3)]
        await lab.backend.submit_run(handle, work("r-hostile", rows, workers=1))
        await lab.wait_run(handle, "r-hostile")
        got, refused, _ = await collect_all(lab, handle, "r-hostile", 3)
        assert refused >= 5
        assert sorted(got) == [0, 1, 2]
        assert all(got[i]["ok"] is True and got[i]["output"] == {"out": f"t{i}"}
                   for i in range(3))

    run(go())


def test_what_an_ended_session_left_is_still_collected(lab, tmp_path):
    async def go():
        handle = await lab.start(flow_copy(tmp_path, "echo"))
        rows = [{"text": f"x{i}"} for i in range(10)]
        await lab.backend.submit_run(handle, work("r-left", rows))
        await lab.wait_run(handle, "r-left")
        await lab.backend.stop_session(handle, reason="stopped before the run was collected")
        got, _, _ = await collect_all(lab, None, "r-left", 10)
        assert sorted(got) == list(range(10))
        await lab.backend.forget_run(None, "r-left")
        assert (await collect_all(lab, None, "r-left", 10))[0] == {}

    run(go())


# --- a flow whose environment adds a package (built where the session runs) ------------------


def where_flow(root: Path) -> Path:
    """A flow whose line answers with the file its package was imported from: it names the
    environment (and, on a cluster, the node's home) the line ran in."""
    flow = make_flow(root, "where", "tinyalpha==1.0\n")
    (flow / "echo.py").write_text(
        "import tinyalpha\nfrom promptflow.core import tool\n\n\n@tool\n"
        "def echo(x: str) -> str:\n    return f'{x}|{tinyalpha.__file__}'\n")
    return flow


def test_the_environment_is_the_flows_own(lab, tmp_path, request):
    """The session imports its environment's packages from its own slot (linked there at
    adoption: no environments folder is bound whole); on Ray the environment was built on
    the node, in the node's own home."""
    async def go():
        flow = where_flow(tmp_path)
        env, _snapshot = await lab.env(flow)
        handle = await lab.start(flow)
        out = await lab.backend.test_line(handle, {"x": "a"}, timeout=60)
        x, path = out["y"].split("|")
        assert x == "a" and path.endswith("tinyalpha/__init__.py")
        assert f"/flow/.env-{env.env_id}-0/" in path and "/envs/" not in path
        if lab.name == "ray":  # built on the node, in the node's own home
            homes = Path(request.getfixturevalue("ray_cluster").node_env("b")
                         ["FLOWSESSION_NODE_HOME"]).parent
            assert list(homes.glob(f"*/envs/{env.env_id}"))
            assert not (lab.settings.envs_dir / env.env_id).exists()

    run(go())


# --- Ray only: a session's actor and its node --------------------------------------------------


@pytest.mark.parametrize("backend_name", ["ray"], indirect=True)
def test_a_killed_actor_takes_its_session_with_it_and_its_node_sweeps_its_folder(lab,
                                                                                   tmp_path):
    import ray

    from flowsession.backends.compute import procs

    async def go():
        flow = flow_copy(tmp_path, "echo")
        compute = await lab.compute()
        handle = await lab.start(flow, compute=compute)
        actor = lab.backend._actor(handle)
        slot = (await actor.info.remote())["slot"]
        folders = list(Path("/tmp").glob(f"flowsession-*/*/slots/{slot}"))
        assert len(folders) == 1
        ray.kill(actor, no_restart=True)
        deadline = time.monotonic() + 30
        while procs.alive(handle.pid, handle.ref["pid_start"]):  # it dies with its actor
            assert time.monotonic() < deadline, "the supervisor outlived its actor"
            await asyncio.sleep(0.2)
        assert (await lab.backend.status(handle)).state == BackendState.LOST
        assert folders[0].exists()  # left behind, as a lost raylet leaves it
        again = await lab.start(flow, compute=compute)  # the same bundle: the same node
        assert again.ref["node_id"] == handle.ref["node_id"]
        assert not folders[0].exists()  # swept by the node's next session

    run(go())


@pytest.mark.parametrize("backend_name", ["ray"], indirect=True)
def test_an_ended_sessions_actor_exits_after_it_lingered(lab, tmp_path):
    import ray

    async def go():
        lab.backend.linger_s = 3
        handle = await lab.start(flow_copy(tmp_path, "echo"), idle=2)
        deadline = time.monotonic() + 60
        while (await lab.backend.status(handle)).state != BackendState.EXITED:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.3)
        while True:  # then, with nobody to collect what it left, it goes
            try:
                ray.get_actor(handle.slot, namespace=handle.ref["namespace"])
            except ValueError:
                break
            assert time.monotonic() < deadline, "the actor is still there"
            await asyncio.sleep(0.5)
        fresh = registry.create(lab.settings)
        assert (await fresh.status(handle)).state == BackendState.LOST

    run(go())

"""The sessions and runs services on every backend, as a user sees them: every session
operation, and runs that lose nothing and store nothing twice when a session is killed or a
node is lost mid-run."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import pytest
from helpers.backends import FLOWS, USER, kill_supervisor
from helpers.flows import SLOW_YAML, make_flow, run

from flowsession.runs.records import RunStatus
from flowsession.runs.service import RunService
from flowsession.runs.spec import RunSpec
from flowsession.sessions.options import StartOptions

pytestmark = pytest.mark.timeout(600)

SLOW_TOOL = '''import time

from promptflow.core import tool


@tool
def slow(text: str, seconds: str) -> str:
    time.sleep(float(seconds))
    return text
'''


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def slow_flow(tmp_path: Path, n: int, seconds: float) -> tuple[Path, Path]:
    folder = tmp_path / "slow"
    folder.mkdir()
    (folder / "flow.dag.yaml").write_text(SLOW_YAML)
    (folder / "slow.py").write_text(SLOW_TOOL)
    return folder, write_jsonl(tmp_path / "slow.jsonl",
                               [{"text": f"l{i}", "seconds": str(seconds)} for i in range(n)])


def where_flow(root: Path, version: str = "1.0") -> Path:
    """A flow whose line answers with its package's version, the file it came from (in the
    slot: the environment's packages are linked there) and the slot's folder as its machine
    sees it (which names, on a cluster, the node that ran it): from /proc/self/mountinfo
    inside the sandbox, else the file's own path."""
    flow = make_flow(root, "where", f"tinyalpha=={version}\n")
    (flow / "echo.py").write_text(
        "import tinyalpha\nfrom promptflow.core import tool\n\n\n"
        "def slot() -> str:\n"
        "    for line in open('/proc/self/mountinfo'):\n"
        "        f = line.split()\n"
        "        if f[4] == '/session/flow':\n"
        "            return f[3]\n"
        "    return tinyalpha.__file__\n\n\n@tool\n"
        "def echo(x: str) -> str:\n"
        "    return f'{x}|{tinyalpha.__version__}|{tinyalpha.__file__}|{slot()}'\n")
    return flow


def stored_positions(rs: RunService, name: str) -> list[int]:
    path = rs.files(name).root / "lines.jsonl"
    return [json.loads(raw)["i"] for raw in path.read_text().splitlines()] \
        if path.exists() else []


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def node_home(slot: str) -> str:
    """The machine's runtime folder a slot is in (``<runtime>/slots/<id>/...``): one per
    node home."""
    return slot.split("/slots/")[0]


# --- sessions -------------------------------------------------------------------------------


def test_every_session_operation_behaves_the_same(rs, tmp_path, backend_name):
    svc = rs.sessions
    flow = where_flow(tmp_path)

    async def go():
        session = await svc.start(flow, user=USER)
        assert session.state == "RUNNING" and session.session_handle.backend == backend_name
        out = await svc.test(flow, {"x": "a"}, user=USER)
        x, version, path, _slot = out["y"].split("|")
        assert (x, version) == ("a", "1.0") and "/flow/.env-" in path
        packages = {p.name: (p.version, p.origin) for p in svc.packages(flow, user=USER)}
        assert packages["tinyalpha"] == ("1.0", "requirements")
        assert packages["promptflow-core"][1] == "image"
        assert "ready" in await svc.session_logs(session)
        # idle time changes in place
        same = await svc.update(flow, user=USER, idle_timeout_s=900)
        assert same.idle_timeout_s == 900 and same.session_handle.slot == \
            session.session_handle.slot
        # Save and install: the new environment beside the running one, then the switch
        (flow / "requirements.txt").write_text("tinyalpha==2.0\n")
        installed = await svc.install(flow, user=USER)
        assert installed.env_id != session.env_id
        assert installed.session_handle.slot != session.session_handle.slot
        assert not svc.backend.alive(session.session_handle)  # the old one was stopped
        out = await svc.test(flow, {"x": "b"}, user=USER)
        assert out["y"].split("|")[1] == "2.0"
        # an edited flow file takes effect at the next line
        (flow / "echo.py").write_text(
            "from promptflow.core import tool\n\n\n@tool\ndef echo(x: str) -> str:\n"
            "    return x + '!'\n")
        assert (await svc.test(flow, {"x": "c"}, user=USER)) == {"y": "c!"}
        reset = await svc.reset(flow, user=USER)
        assert reset.state == "RUNNING" and reset.session_handle.slot != \
            installed.session_handle.slot
        assert (await svc.test(flow, {"x": "d"}, user=USER)) == {"y": "d!"}
        stopped = await svc.stop(flow, user=USER)
        assert stopped.state == "STOPPED"
        assert not svc.backend.alive(reset.session_handle)
        assert "ready" in await svc.session_logs(stopped)  # what was kept of its log
        assert svc.computes.list(user=None) == []  # the serverless compute went with it
        events = [(e.from_state, e.to_state) for e in svc.events(flow, user=USER)]
        assert ("STOPPING", "STOPPED") in events and ("INSTALLING", "RUNNING") in events

    run(go())


def test_an_idle_session_is_stopped_with_the_reason(rs, tmp_path):
    svc = rs.sessions
    flow = Path(shutil.copytree(FLOWS / "echo", tmp_path / "echo"))

    async def go():
        session = await svc.start(flow, user=USER, options=StartOptions(idle_timeout_s=2))
        deadline = time.monotonic() + 60
        while (await svc.refresh(session)).state != "STOPPED":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.5)
        ended = svc.records.get(session.id)
        assert "idle for" in ended.reason and "ended itself" in ended.reason
        assert svc.computes.list(user=None) == []

    run(go())


def test_a_compute_instance_is_booked_until_its_owner_stops_it(rs, tmp_path, backend_name):
    svc = rs.sessions
    flow = Path(shutil.copytree(FLOWS / "echo", tmp_path / "echo"))

    async def go():
        box = await svc.computes.create_instance("box", user=USER, size="tiny")
        handle = box.compute_handle
        assert handle.backend == backend_name and box.state == "RUNNING"
        session = await svc.start(flow, user=USER, options=StartOptions(
            compute_type="instance", instance="box"))
        assert session.compute_id == box.id
        assert (await svc.test(flow, {"text": "on the box"}, user=USER)) == {"out": "on the box"}
        await svc.stop(flow, user=USER)
        assert svc.computes.get("box", user=USER).state == "RUNNING"  # an instance stays
        stopped = await svc.stop_compute(svc.computes.get("box", user=USER), actor=USER,
                                         reason="by its owner")
        assert stopped.state == "STOPPED" and stopped.handle is None
        assert booked(backend_name, handle) is not True
        started = await svc.computes.start("box", user=USER)
        assert started.state == "RUNNING"
        assert booked(backend_name, started.compute_handle) is not False
        await svc.computes.stop(started, reason="done")

    run(go())


def booked(backend_name: str, handle) -> bool | None:
    """Is the compute's size still held (a Ray placement group; a local cgroup)? None: there
    is nothing to see (rlimits hold each process, not the compute)."""
    if backend_name == "ray":
        from ray.util.placement_group import placement_group_table

        name = handle.limits["placement_group"]
        return any(info["name"].split("~")[0] == name and info["state"] != "REMOVED"
                   for info in placement_group_table().values())
    if handle.limits.get("mode") == "rlimit":
        return None
    return all(Path(p).exists() for p in handle.limits.get("paths") or [])


# --- runs ---------------------------------------------------------------------------------------


def test_a_session_killed_mid_run_has_its_lines_rerun_and_none_stored_twice(rs, tmp_path):
    flow, data = slow_flow(tmp_path, 16, 0.4)
    created = run(rs.create(RunSpec(flow=str(flow), data=str(data), workers=1,
                                    max_concurrency=1), user=USER))  # a line at a time
    name = created.name
    wait_until(lambda: run(rs.advance(name, user=USER)).completed >= 4, 120, "four lines")
    handle = rs.sessions.records.get(created.session_id).session_handle
    kill_supervisor(handle)
    wait_until(lambda: not rs.backend.alive(handle), 30, "the session's processes to end")
    done = run(rs.wait(name, user=USER, timeout=240))
    assert done.status == RunStatus.COMPLETED, done.error
    assert (done.total, done.completed, done.failed) == (16, 16, 0)
    assert sorted(stored_positions(rs, name)) == list(range(16))  # each line once
    assert [o["out"] for o in rs.outputs(name, user=USER)] == [f"l{i}" for i in range(16)]
    now = rs.sessions.records.get(done.session_id).session_handle
    assert now.slot != handle.slot  # a new session ran the rest
    assert "resubmit" in (rs.files(name).root / "logs" / "run.log").read_text()


def test_a_run_with_more_workers_than_its_compute_has_vcpus(rs, tmp_path, backend_name):
    flow = where_flow(tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl", [{"x": f"x{i}"} for i in range(30)])
    done = run(rs.wait(run(rs.create(RunSpec(flow=str(flow), data=str(data), workers=3),
                                     user=USER)).name, user=USER, timeout=300))
    assert done.status == RunStatus.COMPLETED, done.error
    assert (done.completed, done.failed) == (30, 0)
    assert sorted(stored_positions(rs, done.name)) == list(range(30))
    rows = [o["y"].split("|") for o in rs.outputs(done.name, user=USER)]
    assert [r[0] for r in rows] == [f"x{i}" for i in range(30)]
    homes = {node_home(r[3]) for r in rows}
    if backend_name == "ray":  # the compute has 1 vCPU: helpers on other bundles and nodes
        assert len(homes) >= 2, homes
    else:  # one machine: every worker on the session's own supervisor
        assert len(homes) == 1


@pytest.mark.parametrize("backend_name", ["ray"], indirect=True)
def test_a_node_lost_mid_run_has_its_lines_rerun_elsewhere_and_none_twice(
        rs, tmp_path, ray_cluster, ray_driver, say):
    from ray.util.placement_group import placement_group, remove_placement_group

    node = ray_cluster.add_node("lost1", cpus=2, memory=2 << 30)
    lost_id = node.node_id
    others = {n["NodeID"]: n["Resources"].get("CPU", 0) for n in ray_driver.nodes()
              if n["Alive"] and n["NodeID"] != lost_id}
    # everything but the doomed node is taken, so the session lands there
    blockers = [placement_group([{"CPU": cpus}], bundle_label_selector=[
        {"ray.io/node-id": node_id}]) for node_id, cpus in others.items() if cpus]
    try:
        for b in blockers:
            assert b.wait(timeout_seconds=60), "the other nodes are busy"
        flow, data = slow_flow(tmp_path, 20, 0.5)
        created = run(rs.create(RunSpec(flow=str(flow), data=str(data), workers=1,
                                        max_concurrency=1), user=USER))  # a line at a time
        name = created.name
        handle = rs.sessions.records.get(created.session_id).session_handle
        assert handle.ref["node_id"] == lost_id
        wait_until(lambda: run(rs.advance(name, user=USER)).completed >= 3, 120,
                   "three lines")
        t0 = time.monotonic()
        ray_cluster.kill_raylet("lost1")
        for b in blockers:  # room elsewhere (an autoscaler would add a node)
            remove_placement_group(b)
        blockers = []
        done = run(rs.wait(name, user=USER, timeout=300))
        say(f"node lost mid-run: the run completed {time.monotonic() - t0:.1f} s after its "
            "node's raylet was killed")
        assert done.status == RunStatus.COMPLETED, done.error
        assert (done.total, done.completed, done.failed) == (20, 20, 0)
        assert sorted(stored_positions(rs, name)) == list(range(20))  # none twice
        assert [o["out"] for o in rs.outputs(name, user=USER)] == [f"l{i}" for i in range(20)]
        now = rs.sessions.records.get(done.session_id).session_handle
        assert now.ref["node_id"] != lost_id
        log = (rs.files(name).root / "logs" / "run.log").read_text()
        assert "resubmit" in log
    finally:
        for b in blockers:
            remove_placement_group(b)


def test_the_standby_pool_serves_a_start(contract_settings, tmp_path, backend_name):
    from dataclasses import replace

    from helpers.backends import services, stop_everything

    rs = services(replace(contract_settings, standby_pool_size=1))
    pool = rs.sessions.pool
    flow = Path(shutil.copytree(FLOWS / "echo", tmp_path / "echo"))
    try:
        assert run(pool.fill()) == 1
        [standby] = pool.members()
        session = run(rs.sessions.start(flow, user=USER))
        assert session.state == "RUNNING" and pool.members() == []  # claimed
        handle = session.session_handle
        # adopted (on Ray, the serverless compute's bundle was booked again on the standby's
        # node, where it fits)
        assert handle.from_standby and handle.slot == standby.slot
        if backend_name == "ray":
            assert handle.ref["node_id"] == standby.ref["node_id"]
            assert handle.ref["placement_group"].startswith(f"fs-{session.compute_id}")
        assert run(rs.sessions.test(flow, {"text": "p"}, user=USER)) == {"out": "p"}
        assert run(pool.fill()) == 1
    finally:
        run(stop_everything(rs.sessions))


def fill_nodes(ray, node_ids: list[str]) -> list:
    """Placement groups that take every CPU left on ``node_ids`` (one CPU each)."""
    from ray.util.placement_group import placement_group, remove_placement_group

    taken = []
    for node_id in node_ids:
        while True:
            pg = placement_group([{"CPU": 1}], bundle_label_selector=[
                {"ray.io/node-id": node_id}])
            if not pg.wait(timeout_seconds=3):
                remove_placement_group(pg)
                break
            taken.append(pg)
    return taken


@pytest.mark.parametrize("backend_name", ["ray"], indirect=True)
def test_a_helpers_node_lost_mid_run_has_its_lines_rerun_and_none_twice(
        rs, tmp_path, ray_cluster, ray_driver, say):
    from ray.util.placement_group import remove_placement_group

    flow, data = slow_flow(tmp_path, 24, 0.5)
    session = run(rs.sessions.start(flow, user=USER))  # on the head or on b
    others = [n["NodeID"] for n in ray_driver.nodes() if n["Alive"]]
    node = ray_cluster.add_node("lost2", cpus=2, memory=2 << 30)
    blockers = fill_nodes(ray_driver, others)  # so the run's helper lands on the new node
    try:
        created = run(rs.create(RunSpec(flow=str(flow), data=str(data), workers=2,
                                        max_concurrency=2), user=USER))  # a line at a time each
        name = created.name
        assert created.session_id == session.id
        wait_until(lambda: run(rs.advance(name, user=USER)).completed >= 6, 120, "six lines")
        t0 = time.monotonic()
        ray_cluster.kill_raylet("lost2")
        done = run(rs.wait(name, user=USER, timeout=300))
        say(f"a run helper's node lost mid-run: the run completed "
            f"{time.monotonic() - t0:.1f} s after the raylet was killed")
        assert done.status == RunStatus.COMPLETED, done.error
        assert (done.total, done.completed, done.failed) == (24, 24, 0)
        assert sorted(stored_positions(rs, name)) == list(range(24))  # none twice
        assert [o["out"] for o in rs.outputs(name, user=USER)] == [f"l{i}" for i in range(24)]
        assert done.session_id == session.id  # the session itself was not lost
        assert "resubmit" in (rs.files(name).root / "logs" / "run.log").read_text()
        del node
    finally:
        for b in blockers:
            remove_placement_group(b)

"""Sessions on this machine, for real: supervisors and workers as processes, bubblewrap,
cgroups, the default image, environments built with uv from the local index."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest
from helpers.flows import make_flow, run

from flowsession.backends.compute import procs
from flowsession.backends.compute.local import LocalBackend
from flowsession.computes.service import ComputeService
from flowsession.environments.service import EnvironmentService
from flowsession.errors import (
    Conflict,
    InvalidInput,
    LineFailed,
    NotFound,
    QuotaExceeded,
    Unsatisfiable,
)
from flowsession.sessions.options import StartOptions
from flowsession.sessions.service import SessionService
from flowsession.store import open_store

USER = "ada"


def make_service(settings, db_url: str | None = None) -> SessionService:
    settings = replace(settings, database_url=db_url) if db_url else settings
    store = open_store(settings.db_url)
    backend = LocalBackend(settings)
    return SessionService(settings, store, envs=EnvironmentService(settings, store),
                          computes=ComputeService(settings, store, backend), backend=backend)


@pytest.fixture
def session_settings(settings):
    return replace(settings, idle_timeout_s=600)  # the default standby pool (1)


@pytest.fixture
def svc(session_settings):
    service = make_service(session_settings)
    yield service
    run(_stop_everything(service))


async def _stop_everything(service: SessionService) -> None:
    for session in service.records.list(owner=None):
        if session.state != "STOPPED":
            try:
                await service._stop(service.records.get(session.id), actor="test", reason="teardown")
            except Exception:
                if session.session_handle:
                    await service.backend.stop_session(session.session_handle)
    await service.pool.drain()
    for compute in service.computes.list(user=None):
        if compute.compute_handle:
            await service.backend.release(compute.compute_handle)


def _gone_within(handle, seconds: float) -> bool:
    """Has the session's top process ended within ``seconds``?"""
    deadline = time.time() + seconds
    while procs.alive(handle.pid, handle.ref["pid_start"]) and time.time() < deadline:
        time.sleep(0.2)
    return not procs.alive(handle.pid, handle.ref["pid_start"])


def echo_flow(root: Path, name: str = "f", requirements: str = "tinyalpha==1.0\n",
              body: str = "return f'{x} with tinyalpha {tinyalpha.__version__}'") -> Path:
    flow = make_flow(root, name, requirements)
    (flow / "echo.py").write_text(
        "import time\nimport tinyalpha\nfrom promptflow.core import tool\n\n\n@tool\n"
        f"def echo(x: str) -> str:\n    {body}\n")
    return flow


def test_a_started_session_runs_lines_sandboxed_within_its_vm_size(svc, tmp_path):
    flow = echo_flow(tmp_path)
    session = run(svc.start(flow, user=USER))
    assert session.state == "RUNNING" and session.compute_type == "serverless"
    assert run(svc.test(flow, {"x": "hi"}, user=USER)) == {"y": "hi with tinyalpha 1.0"}
    shown = run(svc.show(flow, user=USER)).to_dict()
    assert "bubblewrap" in shown["sandbox"]
    assert shown["limits"].startswith(("cgroup", "rlimit"))
    compute = svc.computes.get(session.compute_id, user=USER)
    assert compute.kind == "serverless" and compute.vm_size == "medium"
    states = [e.to_state for e in svc.events(flow, user=USER)]
    assert states == ["NOT_STARTED", "BUILDING", "STARTING", "RUNNING"]


def test_a_changed_flow_file_is_used_by_the_next_test_line(svc, tmp_path):
    flow = echo_flow(tmp_path)
    run(svc.start(flow, user=USER))
    (flow / "echo.py").write_text((flow / "echo.py").read_text().replace("with", "WITH"))
    assert run(svc.test(flow, {"x": "hi"}, user=USER)) == {"y": "hi WITH tinyalpha 1.0"}


def test_one_flow_binds_to_one_session_even_when_started_twice_at_once(session_settings,
                                                                       tmp_path):
    a, b = make_service(session_settings), make_service(session_settings)
    flow = echo_flow(tmp_path)

    async def both():
        return await asyncio.gather(a.start(flow, user=USER), b.start(flow, user=USER))

    try:
        first, second = run(both())
        assert first.id == second.id
        assert [s.id for s in run(a.list(user=USER))] == [first.id]
    finally:
        run(_stop_everything(a))


def test_stop_deletes_the_session_and_its_serverless_compute(svc, tmp_path):
    flow = echo_flow(tmp_path)
    session = run(svc.start(flow, user=USER))
    handle = session.session_handle
    stopped = run(svc.stop(flow, user=USER))
    assert stopped.state == "STOPPED"
    with pytest.raises(NotFound):
        run(svc.show(flow, user=USER))
    assert svc.computes.list(user=USER) == []
    assert not Path(handle.slot).exists()
    assert not procs.alive(handle.pid, handle.ref["pid_start"])


def test_a_start_with_an_unsatisfiable_requirement_leaves_nothing_behind(svc, tmp_path):
    flow = echo_flow(tmp_path, requirements="tinybeta\ntinygamma\n")
    with pytest.raises(Unsatisfiable) as exc:
        run(svc.start(flow, user=USER))
    assert "tinybeta" in str(exc.value)
    with pytest.raises(NotFound):
        run(svc.show(flow, user=USER))
    assert svc.computes.list(user=USER) == []
    last = svc.events(flow, user=USER)[-1]
    assert last.to_state == "STOPPED" and "start failed" in last.reason


def test_save_and_install_switches_only_when_the_new_environment_works(svc, tmp_path):
    flow = echo_flow(tmp_path)
    before = run(svc.start(flow, user=USER))
    unchanged = run(svc.install(flow, user=USER))  # Save and install with nothing new
    assert unchanged.session_handle.pid == before.session_handle.pid
    assert "unchanged" in svc.events(flow, user=USER)[-1].reason
    (flow / "requirements.txt").write_text("tinyalpha==1.0\ntinybeta\ntinygamma\n")
    with pytest.raises(Unsatisfiable) as exc:
        run(svc.install(flow, user=USER))
    assert "tinygamma" in str(exc.value)
    after_failure = run(svc.show(flow, user=USER))
    assert (after_failure.state, after_failure.env_id) == ("RUNNING", before.env_id)
    assert after_failure.session_handle.pid == before.session_handle.pid
    assert run(svc.test(flow, {"x": "still"}, user=USER)) == {"y": "still with tinyalpha 1.0"}

    (flow / "requirements.txt").write_text("tinyalpha==2.0\n")
    installed = run(svc.install(flow, user=USER))
    assert installed.id == before.id and installed.env_id != before.env_id
    assert run(svc.test(flow, {"x": "now"}, user=USER)) == {"y": "now with tinyalpha 2.0"}
    assert {p.name: p.version for p in svc.packages(flow, user=USER)
            if p.origin == "requirements"} == {"tinyalpha": "2.0"}
    assert svc.envs.cache.get(before.env_id).refs == 0  # the old environment was let go


def test_view_installed_packages_shows_image_and_requirements(svc, tmp_path):
    flow = echo_flow(tmp_path)
    run(svc.start(flow, user=USER))
    origins = {p.name: p.origin for p in svc.packages(flow, user=USER)}
    assert origins["tinyalpha"] == "requirements" and origins["promptflow-core"] == "image"


def test_reset_recreates_the_session_and_picks_up_new_requirements(svc, tmp_path):
    flow = echo_flow(tmp_path)
    before = run(svc.start(flow, user=USER))
    (flow / "requirements.txt").write_text("tinyalpha==2.0\n")
    after = run(svc.reset(flow, user=USER))
    assert after.id == before.id and after.state == "RUNNING"
    assert after.session_handle.pid != before.session_handle.pid
    assert run(svc.test(flow, {"x": "r"}, user=USER)) == {"y": "r with tinyalpha 2.0"}


def _worker_pids(svc, session) -> list[int]:
    """Host pids of the session's worker processes (the deepest python processes)."""
    tree = svc.backend.process_tree(session.session_handle)
    parents = set()
    for pid in tree:
        try:
            parents.add(int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]))
        except OSError:
            pass
    return [p for p in tree if p not in parents]


def test_a_killed_worker_is_replaced_and_the_session_says_why(svc, tmp_path):
    flow = echo_flow(tmp_path)
    session = run(svc.start(flow, user=USER))
    workers = _worker_pids(svc, session)
    assert workers
    os.kill(workers[0], signal.SIGKILL)
    time.sleep(0.5)
    shown = run(svc.show(flow, user=USER))
    assert shown.state == "RUNNING" and "SIGKILL" in shown.reason, shown.reason
    assert "a new worker took its place" in shown.reason
    assert run(svc.test(flow, {"x": "yes"}, user=USER)) == {"y": "yes with tinyalpha 1.0"}
    events = svc.records.events([session.id])
    assert [e.reason for e in events].count(shown.reason) == 1  # told once, however often asked
    run(svc.show(flow, user=USER))
    assert [e.reason for e in svc.records.events([session.id])].count(shown.reason) == 1


def test_a_killed_supervisor_is_detected_and_reset_recovers(svc, tmp_path):
    flow = echo_flow(tmp_path)
    session = run(svc.start(flow, user=USER))
    os.kill(session.session_handle.pid, signal.SIGKILL)
    time.sleep(0.3)
    lost = run(svc.show(flow, user=USER))
    assert lost.state == "FAILED" and "gone" in lost.reason
    run(svc.reset(flow, user=USER))
    assert run(svc.test(flow, {"x": "ok"}, user=USER)) == {"y": "ok with tinyalpha 1.0"}


def test_a_failing_line_reports_the_tools_error_and_the_session_runs_on(svc, tmp_path):
    flow = echo_flow(tmp_path, body="raise ValueError(f'bad input {x}')")
    run(svc.start(flow, user=USER))
    with pytest.raises(LineFailed, match="bad input boom"):
        run(svc.test(flow, {"x": "boom"}, user=USER))
    assert run(svc.show(flow, user=USER)).state == "RUNNING"


def test_an_idle_session_ends_itself_even_with_no_control_plane_running(svc, tmp_path):
    flow = echo_flow(tmp_path)
    session = run(svc.start(flow, user=USER, options=StartOptions(idle_timeout_s=1.5)))
    handle = session.session_handle
    # nobody sweeps meanwhile: the supervisor enforces its own idle time
    assert _gone_within(handle, 30)
    run(svc.sweeper.sweep())
    last = svc.events(flow, user=USER)[-1]
    assert last.to_state == "STOPPED" and "idle" in last.reason
    assert svc.computes.list(user=USER) == []


def test_a_long_line_is_not_culled_by_the_idle_time(svc, tmp_path):
    flow = echo_flow(tmp_path, body="time.sleep(3); return x")
    run(svc.start(flow, user=USER, options=StartOptions(idle_timeout_s=1)))
    assert run(svc.test(flow, {"x": "slow"}, user=USER)) == {"y": "slow"}
    assert run(svc.show(flow, user=USER)).state == "RUNNING"


def test_the_culler_stops_a_session_idle_past_its_time(svc, tmp_path):
    flow = echo_flow(tmp_path)
    session = run(svc.start(flow, user=USER, options=StartOptions(idle_timeout_s=3600)))
    # the control plane's idle time runs out first (the supervisor's is still an hour)
    svc.records.set(session.id, idle_timeout_s=1)
    run(svc.sweeper.cull())
    assert run(svc.show(flow, user=USER)).state == "RUNNING"  # not idle long enough yet
    time.sleep(1.5)
    run(svc.sweeper.cull())
    last = svc.events(flow, user=USER)[-1]
    assert last.to_state == "STOPPED" and last.actor == "system:idle-culler"


def test_update_changes_idle_time_in_place_and_vm_size_by_reset(svc, tmp_path):
    flow = echo_flow(tmp_path)
    session = run(svc.start(flow, user=USER))
    pid = session.session_handle.pid
    same = run(svc.update(flow, user=USER, idle_timeout_s=120))
    assert same.idle_timeout_s == 120 and same.session_handle.pid == pid
    moved = run(svc.update(flow, user=USER, vm_size="small"))
    assert moved.vm_size == "small" and moved.session_handle.pid != pid
    assert svc.computes.get(moved.compute_id, user=USER).vm_size == "small"
    assert len(svc.computes.list(user=USER)) == 1  # the old serverless compute went away


def test_instances_host_sessions_and_stopping_one_stops_them_with_the_reason(svc, tmp_path):
    run(svc.computes.create_instance("box", user=USER, size="small"))
    flow = echo_flow(tmp_path)
    with pytest.raises(InvalidInput, match="instance"):
        run(svc.start(flow, user=USER, options=StartOptions(
            compute_type="instance", instance="box", vm_size="large")))
    session = run(svc.start(flow, user=USER, options=StartOptions(compute_type="instance",
                                                                    instance="box")))
    assert svc.computes.get(session.compute_id, user=USER).name == "box"
    run(svc.stop_compute(svc.computes.get("box", user=USER), actor=USER, reason="done"))
    last = svc.events(flow, user=USER)[-1]
    assert last.to_state == "STOPPED" and "compute instance box stopped" in last.reason
    assert svc.computes.get("box", user=USER).state == "STOPPED"  # stopped, not deleted


def test_another_users_compute_is_not_found(svc, tmp_path):
    run(svc.computes.create_instance("mine", user=USER, size="small"))
    with pytest.raises(NotFound):
        svc.computes.get("mine", user="mallory")
    with pytest.raises(NotFound):
        run(svc.start(echo_flow(tmp_path), user="mallory",
                      options=StartOptions(compute_type="instance", instance="mine")))


def test_a_size_over_the_quota_is_refused_with_the_figures(session_settings, tmp_path):
    svc = make_service(replace(session_settings, vcpu_quota=2))
    with pytest.raises(QuotaExceeded) as exc:
        run(svc.start(echo_flow(tmp_path), user=USER, options=StartOptions(vm_size="large")))
    assert "needs 4 vCPU" in str(exc.value) and "of 2" in str(exc.value)


def test_a_restarted_control_plane_reattaches_to_running_sessions(session_settings, tmp_path):
    first = make_service(session_settings)
    flow = echo_flow(tmp_path)
    session = run(first.start(flow, user=USER))
    del first  # the control plane goes away; the session does not
    second = make_service(session_settings)
    try:
        assert run(second.show(flow, user=USER)).state == "RUNNING"
        assert run(second.test(flow, {"x": "back"}, user=USER)) == {"y": "back with tinyalpha 1.0"}
        os.kill(session.session_handle.pid, signal.SIGKILL)
        time.sleep(0.3)
        third = make_service(session_settings)
        run(third.sweeper.sweep())
        assert "gone" in third.records.get(session.id).reason
    finally:
        run(_stop_everything(second))


def test_a_session_from_the_standby_pool_adopts_a_warm_supervisor(session_settings, tmp_path):
    svc = make_service(replace(session_settings, standby_pool_size=1))
    try:
        assert run(svc.pool.fill()) == 1
        standby = svc.pool.members()[0]
        session = run(svc.start(echo_flow(tmp_path), user=USER))
        assert session.session_handle.from_standby
        assert session.session_handle.pid == standby.pid
        assert run(svc.test(tmp_path / "f", {"x": "warm"}, user=USER)) == {
            "y": "warm with tinyalpha 1.0"}
    finally:
        run(_stop_everything(svc))


@pytest.mark.postgres
def test_sessions_work_on_postgresql(session_settings, postgres_url, tmp_path):
    svc = make_service(session_settings, db_url=postgres_url)
    try:
        flow = echo_flow(tmp_path)
        session = run(svc.start(flow, user=USER))
        assert run(svc.test(flow, {"x": "pg"}, user=USER)) == {"y": "pg with tinyalpha 1.0"}
        assert run(svc.stop(flow, user=USER)).state == "STOPPED"
        assert [e.to_state for e in svc.events(flow, user=USER)][-2:] == ["STOPPING", "STOPPED"]
        assert session.id
    finally:
        run(_stop_everything(svc))


def test_an_operation_on_a_session_in_the_wrong_state_says_the_state(svc, tmp_path):
    flow = echo_flow(tmp_path)
    session = run(svc.start(flow, user=USER))
    svc.records.transition(session, "FAILED", actor="test", reason="broken on purpose")
    with pytest.raises(Conflict) as exc:
        run(svc.install(flow, user=USER))
    assert "FAILED" in str(exc.value)


def _slow_uv(tmp_path: Path, real_uv: str, seconds: float) -> str:
    slow = tmp_path / "slow-uv"
    slow.write_text(f"#!/bin/sh\ncase \"$*\" in *install*) sleep {seconds};; esac\n"
                    f"exec {real_uv} \"$@\"\n")
    slow.chmod(0o755)
    return str(slow)


def test_a_stop_during_an_install_wins_and_leaves_nothing_running(svc, tmp_path):
    flow = echo_flow(tmp_path)
    session = run(svc.start(flow, user=USER))
    old_handle = session.session_handle
    svc.envs.builder.uv = _slow_uv(tmp_path, svc.envs.builder.uv, 3)
    (flow / "requirements.txt").write_text("tinyalpha==2.0\n")

    async def install_then_stop():
        install = asyncio.create_task(svc.install(flow, user=USER))
        while svc.records.get(session.id).state != "INSTALLING":
            await asyncio.sleep(0.05)
        stopped = await svc.stop(flow, user=USER)
        with pytest.raises(Conflict, match="stopped during the install"):
            await install
        return stopped

    stopped = run(install_then_stop())
    assert stopped.state == "STOPPED"
    assert svc.records.get(session.id).state == "STOPPED"
    assert not procs.alive(old_handle.pid, old_handle.ref["pid_start"])
    assert all(e.refs == 0 for e in svc.envs.cache.list())  # neither environment is held
    assert svc.computes.list(user=USER) == []


def test_a_control_plane_killed_mid_start_leaves_no_half_started_session(session_settings,
                                                                         tmp_path):
    import subprocess
    import sys

    flow = echo_flow(tmp_path)
    slow = _slow_uv(tmp_path, session_settings.uv, 60)
    code = (
        "import asyncio, sys\n"
        "sys.path.insert(0, 'tests')\n"
        "from pathlib import Path\n"
        "from flowsession.config import Settings\n"
        "from integration.test_sessions import make_service\n"
        f"s = Settings(home=Path({str(session_settings.home)!r}), "
        f"images_path=Path({str(session_settings.images_dir)!r}), "
        f"index_url={session_settings.index_url!r}, uv={slow!r}, standby_pool_size=0)\n"
        f"asyncio.run(make_service(s).start({str(flow)!r}, user={USER!r}))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True,
                            cwd=Path(__file__).resolve().parents[2])
    svc = make_service(session_settings)
    deadline = time.time() + 60
    while time.time() < deadline:
        sessions = svc.records.list(owner=USER)
        if sessions and sessions[0].state == "BUILDING" and list(
                session_settings.envs_dir.glob(".tmp-*")):
            break
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the control plane dies in the middle of the start
    proc.wait()
    run(svc.sweeper.sweep())  # the next control plane reconciles
    [session] = svc.records.list(owner=USER, states=None)
    assert session.state == "STOPPED" and "control plane stopped" in session.reason
    assert svc.computes.list(user=USER) == []
    # the supervisor it had spawned for the start (never recorded) is stopped as an orphan
    slots = session_settings.runtime_dir / "slots"
    assert not list(slots.glob("s*")), "an orphaned supervisor was left running"
    fresh = run(svc.start(flow, user=USER))  # and the flow can start again
    try:
        assert fresh.state == "RUNNING" and fresh.id != session.id
    finally:
        run(_stop_everything(svc))


def test_starting_again_after_the_session_ended_by_itself_gives_a_new_session(svc, tmp_path):
    flow = echo_flow(tmp_path)
    first = run(svc.start(flow, user=USER, options=StartOptions(idle_timeout_s=1)))
    assert _gone_within(first.session_handle, 30)
    second = run(svc.start(flow, user=USER))  # nobody swept: the start notices by itself
    assert second.id != first.id and second.state == "RUNNING"
    assert svc.records.get(first.id).state == "STOPPED"


def test_an_idle_instance_is_stopped_not_deleted(svc):
    run(svc.computes.create_instance("napper", user=USER, size="small", idle_shutdown_s=1))
    run(svc.sweeper.sweep())
    assert svc.computes.get("napper", user=USER).state == "RUNNING"  # not idle long enough
    time.sleep(1.5)
    run(svc.sweeper.sweep())
    compute = svc.computes.get("napper", user=USER)
    assert compute.state == "STOPPED" and "idle shutdown" in compute.reason
    assert run(svc.computes.start("napper", user=USER)).state == "RUNNING"  # it can start again


def test_without_bubblewrap_a_session_runs_and_says_it_is_not_sandboxed(session_settings,
                                                                        tmp_path):
    store = open_store(session_settings.db_url)
    backend = LocalBackend(session_settings, use_sandbox=False)
    svc = SessionService(session_settings, store,
                         envs=EnvironmentService(session_settings, store),
                         computes=ComputeService(session_settings, store, backend),
                         backend=backend)
    flow = echo_flow(tmp_path)
    try:
        session = run(svc.start(flow, user=USER))
        assert session.to_dict()["sandbox"].startswith("not sandboxed")
        assert run(svc.test(flow, {"x": "bare"}, user=USER)) == {"y": "bare with tinyalpha 1.0"}
    finally:
        run(_stop_everything(svc))

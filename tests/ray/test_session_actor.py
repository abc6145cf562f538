"""The spike for a Ray compute backend (issue 13): on a real two-node cluster on 127.0.0.1, a
session actor in a placement group of a VM size's shape, on a chosen node, runs the session in
the flow's interpreter and answers as data; a node lost mid-line is seen by the caller, who
runs the work elsewhere; a detached actor outlives the driver that made it. What was measured
is in docs/ray-notes.md."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import ray_spike
from helpers.netns import sockets
from helpers.ray_cluster import MiB, pss_bytes

from flowsession.backends.compute.procs import alive, start_time

PY = f"python{sys.version_info.major}.{sys.version_info.minor}"


@pytest.fixture(scope="module")
def ray(ray_driver):
    ray_driver.cloudpickle.register_pickle_by_value(ray_spike)  # workers can't import helpers
    return ray_driver


@pytest.fixture(scope="module")
def flow_env(tmp_path_factory) -> dict[str, str]:
    """An "image" venv and a thin "environment" layer over it, as the uv builder makes them
    (here without promptflow: each holds one marker module, and neither holds ray)."""
    root = tmp_path_factory.mktemp("envs")
    paths = {}
    for name in ("image", "layer"):
        subprocess.run([sys.executable, "-m", "uv", "venv", "-q", "-p", sys.executable,
                        str(root / name)], check=True,
                       env={**os.environ, "UV_PYTHON_DOWNLOADS": "never"})
        site = root / name / "lib" / PY / "site-packages"
        (site / f"{name}mark.py").write_text(f"WHERE = {name!r}\n")
        paths[name] = str(site)
    return {"python": str(root / "image" / "bin" / "python"), "image_site": paths["image"],
            "layer_site": paths["layer"]}


def node_ids(ray) -> dict[str, str]:
    """Live nodes by their custom resource name (head, b, ...)."""
    found = {}
    for node in ray.nodes():
        if node["Alive"]:
            for res in node["Resources"]:
                if res in ("head", "b") or res.startswith("doomed"):
                    found[res] = node["NodeID"]
    return found


def vm_size_group(ray, *, cpus: float, memory: int, node_id: str | None = None, **kw):
    """A VM size as a placement group: one bundle of its shape, on ``node_id`` if given."""
    from ray.util.placement_group import placement_group

    selector = [{"ray.io/node-id": node_id}] if node_id else None
    return placement_group([{"CPU": cpus, "memory": memory}], strategy="STRICT_PACK",
                           bundle_label_selector=selector, **kw)


def session_actor(ray, cluster, pg, flow_env, **options):
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    cls = ray.remote(ray_spike.SessionActor)
    return cls.options(
        num_cpus=1, memory=256 * MiB, max_concurrency=4,
        scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=0), **options,
    ).remote(flow_env["python"], [flow_env["layer_site"]], base_dir=str(cluster.dir))


def test_a_session_runs_in_the_flows_interpreter_on_the_chosen_node_within_its_size(
        ray_cluster, ray, flow_env, say):
    b = node_ids(ray)["b"]
    pg = vm_size_group(ray, cpus=1, memory=512 * MiB, node_id=b)
    t0 = time.monotonic()
    ray.get(pg.ready(), timeout=30)
    actor = session_actor(ray, ray_cluster, pg, flow_env)
    where = ray.get(actor.call.remote(
        {"op": "where", "modules": ["imagemark", "layermark", "ray"]}), timeout=60)
    started = time.monotonic() - t0
    try:
        assert ray.get(actor.node_id.remote()) == b
        assert [s for s in sockets() if s.off_loopback()] == []
        assert where["executable"] == flow_env["python"]
        # the image's packages and the environment's layer, and not Ray's interpreter
        assert where["importable"] == {"imagemark": True, "layermark": True, "ray": False}
        # the size is a reservation: a second group of it does not fit on b's 2 GiB
        big = vm_size_group(ray, cpus=1, memory=2048 * MiB, node_id=b)
        with pytest.raises(ray.exceptions.GetTimeoutError):
            ray.get(big.ready(), timeout=3)
        ray.util.remove_placement_group(big)
        actor_pss = pss_bytes(ray.get(actor.pid.remote())) / MiB
        child_pss = pss_bytes(where["pid"]) / MiB
    finally:
        child = ray.get(actor.child_pid.remote())
        assert ray.get(actor.stop.remote()) == 0
        ray.kill(actor)
        ray.util.remove_placement_group(pg)
    assert not alive(child, None)
    say(f"session on node b: group ready, actor up, first answer in {started:.2f} s; "
          f"the actor's PSS {actor_pss:.0f} MiB, its child's {child_pss:.0f} MiB")


def test_a_node_lost_mid_line_is_seen_and_the_line_runs_elsewhere(ray_cluster, ray, flow_env,
                                                                  say):
    ray_cluster.add_node("doomed", cpus=1, memory=1024 * MiB)
    deadline = time.monotonic() + 30
    while "doomed" not in node_ids(ray) and time.monotonic() < deadline:
        time.sleep(0.2)
    doomed = node_ids(ray)["doomed"]
    pg = vm_size_group(ray, cpus=1, memory=512 * MiB, node_id=doomed)
    ray.get(pg.ready(), timeout=30)
    actor = session_actor(ray, ray_cluster, pg, flow_env, max_restarts=0)
    assert ray.get(actor.node_id.remote(), timeout=60) == doomed
    child = ray.get(actor.child_pid.remote())
    child_started = start_time(child)
    line = actor.call.remote({"op": "sleep", "seconds": 60})
    time.sleep(1)  # the line is running in the session

    t0 = time.monotonic()
    ray_cluster.kill_raylet("doomed")
    # the line in flight fails at once, but only as "unavailable: the task may or may not have
    # been executed" (ActorUnavailableError): the caller cannot tell whether the line ran
    with pytest.raises(ray.exceptions.RayActorError) as lost:
        ray.get(line, timeout=60)
    seen = time.monotonic() - t0
    # the actor is declared dead, with the reason, once the node is: calls fail for good
    deadline = time.monotonic() + 60
    while True:
        try:
            ray.get(actor.node_id.remote(), timeout=10)
        except ray.exceptions.ActorDiedError as exc:
            died = exc
            break
        except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
            assert time.monotonic() < deadline, "the actor was never declared dead"
            time.sleep(0.2)
    declared_dead = time.monotonic() - t0
    assert "node" in str(died).lower() and "died" in str(died).lower(), str(died)
    deadline = time.monotonic() + 30
    while alive(child, child_started) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(child, child_started), "the session outlived its actor's node"
    while doomed in node_ids(ray) and time.monotonic() < deadline:
        time.sleep(0.2)
    marked_dead = time.monotonic() - t0
    assert doomed not in node_ids(ray)
    from ray.util.placement_group import placement_group_table

    pinned_state = placement_group_table(pg)["state"]

    # the caller places the work elsewhere: a new group of the same size, a new session
    ray.util.remove_placement_group(pg)
    t1 = time.monotonic()
    pg2 = vm_size_group(ray, cpus=1, memory=512 * MiB)
    ray.get(pg2.ready(), timeout=30)
    again = session_actor(ray, ray_cluster, pg2, flow_env)
    try:
        assert ray.get(again.call.remote({"op": "sleep", "seconds": 0.1}), timeout=60) \
            == {"slept": 0.1}
        assert ray.get(again.node_id.remote()) in (node_ids(ray)["b"], node_ids(ray)["head"])
    finally:
        ray.get(again.stop.remote())
        ray.kill(again)
        ray.util.remove_placement_group(pg2)
    say(f"node lost: the line in flight failed after {seen:.1f} s "
          f"({type(lost.value).__name__}); the actor was declared dead after "
          f"{declared_dead:.1f} s, the node after {marked_dead:.1f} s; "
          f"the group pinned to it was {pinned_state}; rerun elsewhere in "
          f"{time.monotonic() - t1:.2f} s")


DRIVER = textwrap.dedent("""
    import sys
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    sys.path.insert(0, sys.argv[2])
    from helpers import ray_spike
    ray.init(address=sys.argv[1], namespace="flowsession-tests", log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(ray_spike)
    pg = placement_group([{"CPU": 1, "memory": 256 << 20}], strategy="STRICT_PACK",
                         name="pg-detached-spike", lifetime="detached")
    ray.get(pg.ready(), timeout=30)
    a = ray.remote(ray_spike.Probe).options(
        name="session-detached-spike", lifetime="detached", num_cpus=1,
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg)).remote()
    ray.get(a.where.remote([]), timeout=60)
    print(pg.id.hex())
""")


def test_a_detached_session_outlives_the_control_plane_that_made_it(ray_cluster, ray):
    from ray.util.placement_group import get_placement_group, placement_group_table

    tests = str(Path(__file__).parents[1])
    out = subprocess.run([sys.executable, "-c", DRIVER, ray_cluster.address, tests],
                         check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    pg_id = out.stdout.split()[-1]
    # that driver has exited: a fresh one finds the session by the names a handle would store
    actor = ray.get_actor("session-detached-spike")
    pg = None
    try:
        assert ray.get(actor.where.remote(["json"]), timeout=60)["importable"] == {"json": True}
        pg = get_placement_group("pg-detached-spike")
        assert pg.id.hex() == pg_id
        assert placement_group_table(pg)["state"] == "CREATED"
    finally:
        ray.kill(actor)
        ray.util.remove_placement_group(pg or get_placement_group("pg-detached-spike"))


def test_an_actor_runs_in_a_given_venvs_python_only_with_ray_put_on_its_path(
        ray_cluster, ray, flow_env, say):
    """runtime_env={"py_executable": ...} runs the worker with the venv's python, but that
    python must import ray: PYTHONPATH to Ray's site-packages puts every package of the
    control plane in front of the flow's own (the design does not use this)."""
    import ray as ray_pkg

    ray_site = str(Path(ray_pkg.__file__).parents[1])
    t0 = time.monotonic()
    probe = ray.remote(ray_spike.Probe).options(
        num_cpus=0.1, runtime_env={"py_executable": flow_env["python"],
                                   "env_vars": {"PYTHONPATH": ray_site}}).remote()
    try:
        where = ray.get(probe.where.remote(["imagemark", "ray", "fastapi"]), timeout=90)
    finally:
        ray.kill(probe)
    assert where["executable"] == flow_env["python"]
    assert where["importable"] == {"imagemark": True, "ray": True, "fastapi": True}
    say(f"py_executable actor up in {time.monotonic() - t0:.2f} s")

"""A real Ray cluster for the tests of this folder: a head and a second node on 127.0.0.1.

These tests run only inside a network namespace holding loopback alone, where Ray cannot bind
the machine's address: ``make test-ray``, or ``python tests/helpers/netns.py .venv/bin/python
-m pytest tests/ray``. Anywhere else they are skipped, saying so.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from helpers.netns import loopback_only
from helpers.ray_cluster import MiB, RayCluster

HERE = Path(__file__).parent
NAMESPACE = "flowsession-tests"


def pytest_collection_modifyitems(config, items):
    if loopback_only():
        return
    skip = pytest.mark.skip(reason="Ray tests run in a loopback-only network namespace: "
                                   "make test-ray (tests/helpers/netns.py)")
    for item in items:
        if HERE in Path(item.path).parents:
            item.add_marker(skip)


def _say(config, text: str) -> None:
    """Print past pytest's capture: the measurements show in every run."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None:
        return
    if capture is None:
        reporter.write_line("\n" + text)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("\n" + text)


@pytest.fixture
def say(request):
    """``say(text)``: a measurement, printed in every run (not only with -s)."""
    return lambda text: _say(request.config, text)


@pytest.fixture(scope="session")
def ray_cluster(request):
    """A head (1 CPU, 1 GiB, resource ``head``) and node ``b`` (2 CPUs, 2 GiB, resource
    ``b``), for the whole test session; stopped by its own pids."""
    pytest.importorskip("ray", reason="the ray extra is not installed (uv sync --extra ray)")
    t0 = time.monotonic()
    cluster = RayCluster(head_cpus=1, head_memory=1024 * MiB)
    try:
        cluster.add_node("b", cpus=2, memory=2048 * MiB)
        time.sleep(2)  # let both nodes settle before measuring them
        mem = cluster.memory()
        _say(request.config,
             f"ray cluster at {cluster.address}: head up in "
             f"{cluster.nodes['head'].started_s:.1f} s, node b in "
             f"{cluster.nodes['b'].started_s:.1f} s ({time.monotonic() - t0:.1f} s in all); "
             f"idle: {mem['pss'] / MiB:.0f} MiB PSS, {mem['rss'] / MiB:.0f} MiB RSS "
             f"in {sum(len(p) for p in cluster.processes().values())} processes")
        yield cluster
    finally:
        t1 = time.monotonic()
        cluster.stop()
        _say(request.config, f"ray cluster stopped in {time.monotonic() - t1:.1f} s")


@pytest.fixture(scope="session")
def ray_driver(ray_cluster):
    """This test process connected to the cluster as a driver (``import ray`` afterwards)."""
    import ray

    ray.init(address=ray_cluster.address, namespace=NAMESPACE, log_to_driver=False,
             configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()

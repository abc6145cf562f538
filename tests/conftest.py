"""Shared fixtures: a real default image built once per test session (from PyPI, the only
network the suite uses), a fresh home per test, a local package index of tiny wheels, and
PostgreSQL when it is there."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers

from helpers.index_server import LocalIndex  # noqa: E402
from helpers.postgres import new_postgres_database  # noqa: E402
from helpers.wheels import PackageSet  # noqa: E402

from flowsession.backends.compute import procs  # noqa: E402
from flowsession.config import Settings  # noqa: E402
from flowsession.environments.images import DEFAULT_IMAGE  # noqa: E402
from flowsession.environments.service import EnvironmentService  # noqa: E402
from flowsession.store import open_store  # noqa: E402

os.environ["UV_PYTHON_DOWNLOADS"] = "never"
for _var in ("UV_INDEX_URL", "UV_EXTRA_INDEX_URL", "UV_DEFAULT_INDEX", "UV_INDEX",
             "UV_FIND_LINKS", "VIRTUAL_ENV", "FLOWSESSION_HOME", "FLOWSESSION_DATABASE_URL"):
    os.environ.pop(_var, None)



# --- CI: what the README needs is there, or the suite fails (never a silent skip) -------------

CI = bool(os.environ.get("CI"))
# skips that are by design, not a missing part: each contract half runs in its own make target
ALLOWED_SKIPS = ("the Ray half of the contract suite", "the local half of the contract suite",
                 "Ray tests run in a loopback-only network namespace")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With ``CI`` set, a skipped test is a failed one, with the reason it gave: a missing
    PostgreSQL, bubblewrap, cgroup controller or uv fails CI instead of thinning it."""
    outcome = yield
    report = outcome.get_result()
    if not CI or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if any(allowed in reason for allowed in ALLOWED_SKIPS):
        return
    report.outcome = "failed"
    report.longrepr = (f"CI is set, so this skip is a failure: {reason.removeprefix('Skipped: ')}"
                       "\n(install what it names -- `make setup` installs bubblewrap; PostgreSQL "
                       "on 127.0.0.1:5432, db `test`; run as root for cgroups -- or unset CI)")


@pytest.fixture(scope="session")
def images_dir(tmp_path_factory) -> Path:
    """The default image, built once for the whole suite and shared by every test's home.
    ``FLOWSESSION_TEST_IMAGES`` names a folder where it was built before (``make test-ray``
    builds it there before entering its network namespace, which has no package index)."""
    prebuilt = os.environ.get("FLOWSESSION_TEST_IMAGES")
    images = Path(prebuilt) if prebuilt else tmp_path_factory.mktemp("images")
    settings = Settings(home=tmp_path_factory.mktemp("image-builder"), images_path=images)
    svc = EnvironmentService(settings, open_store(settings.db_url))
    asyncio.run(svc.images.ensure_built(DEFAULT_IMAGE))
    return images


@pytest.fixture(scope="session")
def image_versions(images_dir, tmp_path_factory) -> dict[str, str]:
    settings = Settings(home=tmp_path_factory.mktemp("versions"), images_path=images_dir)
    svc = EnvironmentService(settings, open_store(settings.db_url))
    image = asyncio.run(svc.images.ensure_built(DEFAULT_IMAGE))
    return svc.images.layers(image).versions()


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory, image_versions) -> PackageSet:
    """Tiny packages, including conflicting versions and stand-ins for image packages."""
    pkgs = PackageSet(tmp_path_factory.mktemp("wheels"))
    pkgs.add("tinyalpha", "1.0").add("tinyalpha", "2.0")
    pkgs.add("tinybeta", "1.0", requires=["tinyalpha==1.0"])
    pkgs.add("tinygamma", "1.0", requires=["tinyalpha==2.0"])
    pkgs.add("tinydelta", "1.0", requires=["tinyalpha>=1"])
    pkgs.add("tinysecret", "1.0")
    # Needs an older 'packaging' than the image has. The index carries metadata-only stand-ins
    # of packaging (never installed: the image provides it) so the resolver can explain.
    pkgs.add("tinyclash", "1.0", requires=["packaging<20"])
    pkgs.add("packaging", "19.0").add("packaging", image_versions["packaging"])
    return pkgs


@pytest.fixture(scope="session")
def index(wheelhouse):
    with LocalIndex(wheelhouse.directory) as idx:
        yield idx


@pytest.fixture
def settings(tmp_path, images_dir, index) -> Settings:
    settings = Settings(home=tmp_path / "home", images_path=images_dir, index_url=index.url,
                        failed_build_memory_seconds=30.0)
    yield settings
    stop_local_server(settings)  # the server the CLI started for this home, if any
    # no test may leave a session's process behind: kill any, and say which test did
    leftovers = procs.with_argument_under(str(settings.runtime_dir))
    for pid in leftovers:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(settings.runtime_dir, ignore_errors=True)  # sessions' slots under /tmp
    if leftovers:  # an error in this test's teardown: the test that leaked is the one named
        pytest.fail(f"session processes left running by this test (killed): "
                    f"{sorted(leftovers)}", pytrace=False)


def stop_local_server(settings: Settings) -> None:
    """Stop the local server of ``settings.home`` (``flowsession server stop``), and kill any
    server process still serving that home."""
    from flowsession.cli.server import stop_local_server as stop

    stop(settings, timeout=15)
    home = str(settings.home)
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                args = fh.read().split(b"\0")
            with open(f"/proc/{entry}/environ", "rb") as fh:
                environ = fh.read().split(b"\0")
        except OSError:
            continue
        if b"flowsession.cli.main" in args and b"server" in args \
                and f"FLOWSESSION_HOME={home}".encode() in environ:
            with contextlib.suppress(OSError):
                os.kill(int(entry), signal.SIGKILL)
            procs.reap(int(entry))


@pytest.fixture
def service(settings) -> EnvironmentService:
    return EnvironmentService(settings, open_store(settings.db_url))


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """A fresh database on the local PostgreSQL server (skips when there is none)."""
    with new_postgres_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db_service(request, settings) -> EnvironmentService:
    """The environment service on SQLite and on PostgreSQL."""
    if request.param == "postgresql":
        url = request.getfixturevalue("postgres_url")
        s = replace(settings, database_url=url)
        store = open_store(url)
        from flowsession.store.tables import metadata

        with store.engine.begin() as c:  # each test starts from empty tables
            for table in reversed(metadata.sorted_tables):
                c.execute(table.delete())
        return EnvironmentService(s, store)
    return EnvironmentService(settings, open_store(settings.db_url))


# --- a real Ray cluster on 127.0.0.1 (tests/ray and the contract suite's Ray half) ----------------

RAY_NAMESPACE = "flowsession-tests"


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
def ray_cluster(request, images_dir, tmp_path_factory):
    """A head (1 CPU, 1 GiB, resource ``head``) and node ``b`` (2 CPUs, 2 GiB, resource
    ``b``), for the whole test session; stopped by its own pids. Each node has a home of its
    own (``FLOWSESSION_NODE_HOME``: its environments, snapshots and sessions); the default
    image is adopted from ``images_dir``, built before (a KubeRay node image would ship it)."""
    pytest.importorskip("ray", reason="the ray extra is not installed (uv sync --extra ray)")
    from helpers.ray_cluster import MiB, RayCluster

    t0 = time.monotonic()
    homes = tmp_path_factory.mktemp("ray-nodes")

    def node_env(name: str) -> dict[str, str]:
        return {"FLOWSESSION_NODE_HOME": str(homes / name),
                "FLOWSESSION_IMAGES_DIR": str(images_dir),
                "UV_PYTHON_DOWNLOADS": "never"}

    cluster = RayCluster(head_cpus=1, head_memory=1024 * MiB, node_env=node_env)
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

    ray.init(address=ray_cluster.address, namespace=RAY_NAMESPACE, log_to_driver=False,
             configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()

"""Shared fixtures: a real default image built once per test session (from PyPI, the only
network the suite uses), a fresh home per test, a local package index of tiny wheels, and
PostgreSQL when it is there."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import warnings
import shutil
import sys
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers

from helpers.index_server import LocalIndex  # noqa: E402
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

POSTGRES_URL = os.environ.get("FLOWSESSION_TEST_POSTGRES", "postgresql+psycopg://root@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def images_dir(tmp_path_factory) -> Path:
    """The default image, built once for the whole suite and shared by every test's home."""
    images = tmp_path_factory.mktemp("images")
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
    if leftovers:
        warnings.warn(f"processes left running by this test: {sorted(leftovers)}")


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
    try:
        import psycopg

        admin = psycopg.connect("host=127.0.0.1 port=5432 dbname=test user=root",
                                autocommit=True, connect_timeout=3)
    except Exception as exc:  # no server here: the SQLite runs still cover the logic
        pytest.skip(f"PostgreSQL on 127.0.0.1:5432 is not reachable: {exc}")
    name = f"flowsession_{uuid.uuid4().hex[:10]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    yield POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"
    admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


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

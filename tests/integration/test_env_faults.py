"""Faults around environment builds: leaked secrets, killed builds, the disk budget, and
failures remembered briefly. Real uv, real processes, SQLite and PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from helpers.flows import make_flow, run
from helpers.index_server import LocalIndex

from flowsession.environments.service import EnvironmentService
from flowsession.errors import DiskBudgetExceeded
from flowsession.store import open_store

SECRET_USER, SECRET = "feeduser", "Sup3r-s3cret/t0ken+=="


def _all_bytes_under(root: Path) -> list[tuple[Path, bytes]]:
    out = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            out.append((path, path.read_bytes()))
    return out


def test_a_feed_secret_appears_nowhere(settings, tmp_path, wheelhouse):
    """Not in logs, locks, package lists, errors, database rows, uv's cache or process args."""
    argv_log = tmp_path / "uv-argv.log"
    wrapper = tmp_path / "uv-wrapper"
    real_uv = settings.uv
    wrapper.write_text(f"#!/bin/sh\necho \"$@\" >> {argv_log}\nexec {real_uv} \"$@\"\n")
    wrapper.chmod(0o755)
    uv_cache = tmp_path / "uv-cache"
    settings = replace(settings, uv=str(wrapper))
    service = EnvironmentService(settings, open_store(settings.db_url))
    os.environ["UV_CACHE_DIR"] = str(uv_cache)
    try:
        with LocalIndex(wheelhouse.directory, auth=(SECRET_USER, SECRET)) as private:
            service.secrets.set(private.host, f"{SECRET_USER}:{SECRET}")
            flow = make_flow(tmp_path, "f", f"-i http://{{private}}@{private.host}/simple\n"
                                            "tinysecret\n")
            env = run(service.ensure_for_flow(flow))
            packages = service.packages(env)
            listed = service.secrets.list()
    finally:
        os.environ.pop("UV_CACHE_DIR")
    assert env.packages() == {"tinysecret": "1.0"}
    forms = {SECRET, SECRET.replace("/", "%2F").replace("+", "%2B").replace("=", "%3D")}
    assert listed[0]["secret"] == f"{SECRET_USER}:****"
    haystacks = [("package list", repr(packages).encode()), ("lock", env.lock.encode()),
                 ("uv arguments", argv_log.read_bytes())]
    haystacks += [(str(p), b) for p, b in _all_bytes_under(settings.home)]  # db, logs, envs
    haystacks += [(str(p), b) for p, b in _all_bytes_under(uv_cache)]
    assert argv_log.read_bytes(), "the wrapper saw uv's invocations"
    for where, data in haystacks:
        for form in forms:
            assert form.encode() not in data, f"the secret leaked into {where}"


def _build_in_subprocess(settings, flow: Path) -> subprocess.Popen:
    code = (
        "import asyncio, sys\n"
        "from flowsession.config import Settings\n"
        "from flowsession.environments.service import EnvironmentService\n"
        "from flowsession.store import open_store\n"
        "from pathlib import Path\n"
        f"s = Settings(home=Path({str(settings.home)!r}), images_path=Path({str(settings.images_dir)!r}),"
        f" index_url={settings.index_url!r}, uv={settings.uv!r})\n"
        "svc = EnvironmentService(s, open_store(s.db_url))\n"
        f"asyncio.run(svc.ensure_for_flow({str(flow)!r}))\n"
    )
    return subprocess.Popen([sys.executable, "-c", code], start_new_session=True)


def test_a_build_killed_half_way_leaves_nothing_and_the_next_build_succeeds(settings, tmp_path):
    # uv that installs slowly: the kill lands while the environment is half built
    slow = tmp_path / "slow-uv"
    slow.write_text(f"#!/bin/sh\ncase \"$*\" in *install*) sleep 60;; esac\nexec {settings.uv} \"$@\"\n")
    slow.chmod(0o755)
    flow = make_flow(tmp_path, "f", "tinyalpha==1.0\n")
    proc = _build_in_subprocess(replace(settings, uv=str(slow)), flow)
    deadline = time.time() + 60
    while (not list(settings.envs_dir.glob(".tmp-*")) and proc.poll() is None
           and time.time() < deadline):
        time.sleep(0.1)
    assert list(settings.envs_dir.glob(".tmp-*")), "the build never started"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    service = EnvironmentService(settings, open_store(settings.db_url))
    env = run(service.ensure_for_flow(flow))
    assert env.state == "READY" and env.packages() == {"tinyalpha": "1.0"}
    assert list(settings.envs_dir.glob(".tmp-*")) == []
    out = subprocess.run([str(env.python), "-c", "import tinyalpha"], capture_output=True)
    assert out.returncode == 0


def _envs(service, tmp_path, *versions_of_alpha_and_names):
    return [run(service.ensure_for_flow(make_flow(tmp_path, name, reqs)))
            for name, reqs in versions_of_alpha_and_names]


def test_the_disk_budget_evicts_the_least_recently_used_environment(any_db_service, tmp_path):
    svc = any_db_service
    a, b = _envs(svc, tmp_path, ("a", "tinyalpha==1.0\n"), ("b", "tinyalpha==2.0\n"))
    run(svc.ensure_for_flow(tmp_path / "a"))  # a is now more recently used than b
    size = max(a.size_bytes, b.size_bytes)
    svc.cache.settings = replace(svc.cache.settings, env_disk_budget=int(size * 2.5))
    c = run(svc.ensure_for_flow(make_flow(tmp_path, "c", "tinydelta==1.0\n")))
    ids = {e.id for e in svc.cache.list()}
    assert ids == {a.id, c.id}
    assert not Path(b.path).exists()


def test_an_environment_in_use_is_never_evicted(any_db_service, tmp_path):
    svc = any_db_service
    a = run(svc.ensure_for_flow(make_flow(tmp_path, "a", "tinyalpha==1.0\n"), holder="session:1"))
    b = run(svc.ensure_for_flow(make_flow(tmp_path, "b", "tinyalpha==2.0\n")))
    run(svc.ensure_for_flow(tmp_path / "b"))  # a is the least recently used, but held
    svc.cache.settings = replace(svc.cache.settings,
                                 env_disk_budget=int(max(a.size_bytes, b.size_bytes) * 2.5))
    c = run(svc.ensure_for_flow(make_flow(tmp_path, "c", "tinydelta==1.0\n")))
    assert {e.id for e in svc.cache.list()} == {a.id, c.id}
    assert svc.cache.get(a.id).refs == 1


def test_when_everything_is_in_use_a_new_build_is_refused_clearly(any_db_service, tmp_path):
    svc = any_db_service
    a = run(svc.ensure_for_flow(make_flow(tmp_path, "a", "tinyalpha==1.0\n"), holder="session:1"))
    svc.cache.settings = replace(svc.cache.settings, env_disk_budget=int(a.size_bytes * 1.5))
    with pytest.raises(DiskBudgetExceeded) as exc:
        run(svc.ensure_for_flow(make_flow(tmp_path, "b", "tinyalpha==2.0\n")))
    assert "disk budget" in str(exc.value) and "in use by sessions" in str(exc.value)
    assert "FLOWSESSION_ENV_DISK_BUDGET" in exc.value.hint
    assert [e.id for e in svc.cache.list()] == [a.id]
    assert sorted(p.name for p in svc.settings.envs_dir.iterdir() if not p.name.startswith(".")) \
        == [a.id]
    svc.cache.release(a.id, "session:1")  # released: now it may go to make room
    b = run(svc.ensure_for_flow(tmp_path / "b"))
    assert [e.id for e in svc.cache.list()] == [b.id]


def test_reference_counts_follow_the_sessions_that_hold_them(any_db_service, tmp_path):
    svc = any_db_service
    env = run(svc.ensure_for_flow(make_flow(tmp_path, "a", "tinyalpha==1.0\n")))
    svc.cache.acquire(env.id, "session:1")
    svc.cache.acquire(env.id, "session:2")
    svc.cache.acquire(env.id, "session:2")  # the same holder twice counts once
    assert svc.cache.get(env.id).refs == 2
    with pytest.raises(Exception, match="in use by"):
        svc.cache.remove(env.id)
    svc.cache.release(env.id, "session:1")
    svc.cache.release(env.id, "session:2")
    svc.cache.remove(env.id)
    assert svc.cache.list() == [] and not Path(env.path).exists()


def test_a_failed_build_is_remembered_briefly_then_retried(settings, tmp_path, index):
    flow = make_flow(tmp_path, "f", "tinyalpha==1.0\n")
    service = EnvironmentService(settings, open_store(settings.db_url))
    prepared = run(service.prepare(flow))  # resolved while the index is up
    broken = EnvironmentService(replace(settings, index_url="http://127.0.0.1:9/simple"),
                                service.store)
    os.environ["UV_HTTP_RETRIES"] = "0"
    try:
        with pytest.raises(Exception, match="could not be reached"):
            run(broken.ensure(prepared))
        with pytest.raises(Exception, match="retrying is paused briefly"):
            run(service.ensure(prepared))  # remembered: not retried at once, even if fixed
    finally:
        os.environ.pop("UV_HTTP_RETRIES")
    service.cache.clock = lambda: time.time() + 60  # later, the memory has faded
    env = run(service.ensure(prepared))
    assert env.state == "READY"

"""One suite for every compute backend: each test runs on the local backend and on a real Ray
cluster (a head and a second node on 127.0.0.1, ``tests/conftest.py``'s ``ray_cluster``).

The two halves run in different places, each exactly once: the local half with the rest of the
suite (``make test``), the Ray half inside a loopback-only network namespace (``make test-ray``,
which ``make test`` runs too). Each half is skipped where the other runs, saying where it runs.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest
from helpers.backends import Lab, services, stop_everything
from helpers.netns import loopback_only

from flowsession.backends.compute import registry
from flowsession.config import Settings
from flowsession.environments.service import EnvironmentService
from flowsession.store import open_store

HERE = Path(__file__).parent
# sizes that fit the test cluster (head: 1 CPU, 1 GiB; node b: 2 CPUs, 2 GiB)
SIZES = '[tiny]\nvcpu = 1\nmemory_gb = 1\n\n[small]\nvcpu = 1\nmemory_gb = 1\n'
BACKENDS = ("local", "ray")


def pytest_collection_modifyitems(config, items):
    inside = loopback_only()
    for item in items:
        if HERE not in Path(item.path).parents:
            continue
        name = getattr(item, "callspec", None) and item.callspec.params.get("backend_name")
        if name == "ray" and not inside:
            item.add_marker(pytest.mark.skip(reason="the Ray half of the contract suite runs "
                                                    "in make test-ray (a loopback-only network "
                                                    "namespace)"))
        elif name == "local" and inside:
            item.add_marker(pytest.mark.skip(reason="the local half of the contract suite runs "
                                                    "with the rest of the suite (make test)"))


@pytest.fixture(params=BACKENDS)
def backend_name(request) -> str:
    return request.param


@pytest.fixture
def contract_settings(settings, backend_name, request, tmp_path) -> Settings:
    sizes = tmp_path / "sizes.toml"
    sizes.write_text(SIZES)
    s = replace(settings, standby_pool_size=0, idle_timeout_s=600, vm_sizes_file=sizes,
                default_vm_size="tiny", backend=backend_name)
    if backend_name == "ray":
        cluster = request.getfixturevalue("ray_cluster")
        request.getfixturevalue("ray_driver")  # this process's connection to it
        s = replace(s, ray_address=cluster.address)
    return s


@pytest.fixture
def lab(contract_settings):
    store = open_store(contract_settings.db_url)
    made = Lab(contract_settings, store, registry.create(contract_settings),
               EnvironmentService(contract_settings, store))
    yield made
    asyncio.run(made.close())


@pytest.fixture
def rs(contract_settings):
    svc = services(contract_settings)
    yield svc
    asyncio.run(stop_everything(svc.sessions))



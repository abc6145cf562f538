"""A real Ray cluster for the tests of this folder: a head and a second node on 127.0.0.1.

These tests run only inside a network namespace holding loopback alone, where Ray cannot bind
the machine's address: ``make test-ray``, or ``python tests/helpers/netns.py .venv/bin/python
-m pytest tests/ray``. Anywhere else they are skipped, saying so.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.netns import loopback_only

HERE = Path(__file__).parent
# the cluster (``ray_cluster``), the driver (``ray_driver``) and ``say`` are the suite's
# (tests/conftest.py): the contract suite (tests/contract) runs on the same cluster


def pytest_collection_modifyitems(config, items):
    if loopback_only():
        return
    skip = pytest.mark.skip(reason="Ray tests run in a loopback-only network namespace: "
                                   "make test-ray (tests/helpers/netns.py)")
    for item in items:
        if HERE in Path(item.path).parents:
            item.add_marker(skip)

"""Fixtures the integration suites share: ``server`` (a real server of a test module's own,
module-scoped), and, defined beside the tests that grew them, ``fs`` (a CLI against a real local
server, test_cli_runs) and ``rs`` / ``run_settings`` (a RunService on real sessions,
test_runs). A module's own fixture of the same name wins over these."""

import pytest
from helpers.server import serving
from test_cli_runs import fs  # noqa: F401
from test_runs import rs, run_settings  # noqa: F401


@pytest.fixture(scope="module")
def server(request, tmp_path_factory, images_dir):
    """A real server for the test module, its home named after the module."""
    home = tmp_path_factory.mktemp(request.module.__name__.removeprefix("test_")) / "home"
    with serving(home, images_dir, None) as srv:
        yield srv

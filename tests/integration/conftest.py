"""Fixtures the integration suites share, defined beside the tests that grew them: ``fs`` (a
CLI against a real local server, test_cli_runs) and ``rs`` / ``run_settings`` (a RunService
on real sessions, test_runs). A module's own fixture of the same name wins over these."""

from test_cli_runs import fs  # noqa: F401
from test_runs import rs, run_settings  # noqa: F401

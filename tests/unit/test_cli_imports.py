"""The CLI and the SDK speak to the server over HTTP: starting them must not load the server's
store, services or their libraries (SQLAlchemy alone cost most of a second per command)."""

from __future__ import annotations

import subprocess
import sys

import pytest

# what only the server needs: its database, its web framework, the packaging of environments
SERVER_ONLY = ("sqlalchemy", "alembic", "fastapi", "uvicorn", "packaging", "flowsession.store",
               "flowsession.api.operations", "flowsession.runs.records",
               "flowsession.sessions.records", "flowsession.environments.service")

CHECK = """
import sys
{code}
loaded = sorted(m for m in {server_only!r} if m in sys.modules)
print("LOADED:" + ",".join(loaded))
"""


def _loaded(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", CHECK.format(code=code, server_only=SERVER_ONLY)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1]  # after any help text
    assert last.startswith("LOADED:"), out.stdout
    return [m for m in last.removeprefix("LOADED:").split(",") if m]


@pytest.mark.parametrize("code", [
    "import flowsession.cli.main",
    "import flowsession.client",
    # every command registered and its help shown: what `flowsession --help` does
    "from flowsession.cli.main import app\ntry:\n    app(['--help'])\nexcept SystemExit:\n    pass",
    "from flowsession.cli.main import app\ntry:\n    app(['run', 'show', '--help'])\n"
    "except SystemExit:\n    pass",
], ids=["cli", "sdk", "help", "run-show-help"])
def test_cli_does_not_load_the_server(code: str) -> None:
    assert _loaded(code) == [], "the CLI/SDK imported server-only modules"


def test_values_the_records_share_are_the_same_objects() -> None:
    """The server's record modules and the client's light modules hold one definition."""
    from flowsession.access import MASK, USER_IDENTITY, connections, secrets
    from flowsession.api import operation_status, operations
    from flowsession.runs import model as run_model
    from flowsession.runs import records as run_records
    from flowsession.sessions import model as session_model
    from flowsession.sessions import records as session_records

    assert run_records.Run is run_model.Run and run_records.RunStatus is run_model.RunStatus
    assert session_records.Session is session_model.Session
    assert operations.OperationStatus is operation_status.OperationStatus
    assert secrets.USER_IDENTITY == USER_IDENTITY and connections.MASK == MASK

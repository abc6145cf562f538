"""The ``flowsession`` console command, as the CLI tests run it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _executable() -> str:
    for candidate in (REPO / ".venv" / "bin" / "flowsession",
                      Path(sys.executable).parent / "flowsession"):
        if candidate.exists():
            return str(candidate)
    return shutil.which("flowsession") or "flowsession"


FLOWSESSION = _executable()


def runner(url: str, token: str, cwd: Path) -> Callable[..., subprocess.CompletedProcess]:
    """``flowsession ARGS...`` against the server at ``url`` as the holder of ``token``, in
    ``cwd``, with none of the caller's FLOWSESSION_* settings; a traceback fails the test."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWSESSION_")}
    env.update(FLOWSESSION_URL=url, FLOWSESSION_TOKEN=token, COLUMNS="200", NO_COLOR="1")

    def run(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([FLOWSESSION, *args], env=env, cwd=cwd, capture_output=True,
                              text=True, timeout=300, check=False)
        assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
        return proc

    return run

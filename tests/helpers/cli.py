"""The ``flowsession`` console command, as the CLI tests run it."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _executable() -> str:
    for candidate in (REPO / ".venv" / "bin" / "flowsession",
                      Path(sys.executable).parent / "flowsession"):
        if candidate.exists():
            return str(candidate)
    return shutil.which("flowsession") or "flowsession"


FLOWSESSION = _executable()

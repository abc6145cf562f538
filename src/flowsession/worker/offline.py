"""Sessions are offline by design: promptflow's telemetry is off in every session, so nothing
in a session tries to reach an outside host (or waits on DNS for one on a closed network).

promptflow (1.18) reads its telemetry consent from ``pf.yaml`` in its home
(``PF_HOME_DIRECTORY``, else ``~/.promptflow``): ``telemetry.enabled``, as ``pf config set
telemetry.enabled=false`` writes it; earlier versions read ``TELEMETRY_ENABLED``. Both are set
here, in the session's own home, before any promptflow code is imported. Stdlib only.
"""

from __future__ import annotations

import os
from pathlib import Path

OFFLINE_ENV = {
    "PF_DISABLE_TRACING": "true",  # no trace collector (promptflow starts none when true)
    "TELEMETRY_ENABLED": "false",  # promptflow before 1.x devkit read this
    "PF_DISABLE_TELEMETRY": "true",
}
_CONSENT = "telemetry:\n  enabled: false\n"


def promptflow_offline() -> None:
    """Set the environment and write ``pf.yaml`` (unless it says something of telemetry
    already) in the session's promptflow home."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    home = Path(os.environ.get("PF_HOME_DIRECTORY") or Path.home() / ".promptflow")
    config = home / "pf.yaml"
    try:
        home.mkdir(parents=True, exist_ok=True)
        text = config.read_text(encoding="utf-8") if config.is_file() else ""
        if "telemetry" not in text:
            config.write_text(text + ("" if not text or text.endswith("\n") else "\n")
                              + _CONSENT, encoding="utf-8")
    except OSError:
        pass  # a read-only home: the environment variables still say it

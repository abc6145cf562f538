"""The ``environment_variables`` of a flow's yaml, as prompt flow sets them before a flow runs
(``pf`` does it for ``flow test`` and batch runs, DAG and flex alike). Stdlib and promptflow
only; runs inside a worker, after the fork, so only that worker's environment changes."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

log = logging.getLogger("flowsession.worker")

_REFERENCE = re.compile(r"^\$\{([^.{}]+)\.([^.{}]+)\}$")  # ${connection.key}


def flow_environment(flow_yaml: Path, connections: dict[str, Any]) -> dict[str, str]:
    """The yaml's ``environment_variables``: literal values as text, ``${conn.key}`` from the
    session's connections (a reference to a connection it does not have is left out, and
    logged)."""
    try:
        from promptflow._utils.yaml_utils import load_yaml

        with open(flow_yaml, encoding="utf-8") as f:
            spec = load_yaml(f) or {}
    except Exception:  # noqa: BLE001 - a yaml the executor will refuse, saying why
        return {}
    declared = spec.get("environment_variables") if isinstance(spec, dict) else None
    if not isinstance(declared, dict):
        return {}
    out: dict[str, str] = {}
    for key, value in declared.items():
        m = _REFERENCE.match(str(value).strip()) if isinstance(value, str) else None
        if m is None:
            out[str(key)] = str(value)
            continue
        conn = connections.get(m.group(1))
        found = (conn.get("value") or {}).get(m.group(2)) if isinstance(conn, dict) else None
        if found is None:
            log.warning("environment variable %s: no connection value %s", key, value)
            continue
        out[str(key)] = str(found)
    return out


def apply_flow_environment(flow_yaml: Path, connections: dict[str, Any]) -> None:
    os.environ.update(flow_environment(flow_yaml, connections))


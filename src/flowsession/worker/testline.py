"""Run one line of a flow with promptflow-core and print its outputs as JSON.

    python -m flowsession.worker.testline [FLOW_DIR] --inputs name=Ada [--inputs k=v ...]

Runs in the flow's environment (``flowsession env run FLOW -- python -m ...``); the first
building block of sessions' warm workers.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from flowsession.worker.offline import promptflow_offline
from flowsession.worker.outputs import flow_outputs


def _flow_file(folder: Path) -> Path:
    for name in ("flow.dag.yaml", "flow.dag.yml", "flow.flex.yaml", "flow.flex.yml"):
        if (folder / name).is_file():
            return folder / name
    raise SystemExit(f"error: no flow.dag.yaml or flow.flex.yaml in {folder}")


def _inputs(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"error: --inputs takes key=value, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flowsession.worker.testline")
    parser.add_argument("flow", nargs="?", default=".")
    parser.add_argument("--inputs", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    logging.disable(logging.INFO)  # promptflow's per-node INFO lines are noise here
    promptflow_offline()
    from promptflow.executor import FlowExecutor

    folder = Path(args.flow).resolve()
    executor = FlowExecutor.create(_flow_file(folder), {}, working_dir=folder)
    result = executor.exec_line(_inputs(args.inputs))
    status = str(getattr(result.run_info.status, "value", result.run_info.status))
    if status != "Completed":
        error = result.run_info.error or {}
        sys.stderr.write(f"error: the line failed: {error.get('message', status)}\n")
        return 1
    outputs = flow_outputs(result.output, None, set())
    sys.stdout.write(json.dumps(outputs, default=str, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

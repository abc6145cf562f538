"""Benchmark: how long a short CLI command takes, whole processes (issue 11: the CLI's start),
beside prompt flow's `pf` in the same run.

  flowsession --help               no server
  flowsession run list --json      against this home's local server (started first, not counted)
  flowsession run show NAME --json a run that does not exist (the server answers 404)
  pf --help / pf run list          promptflow-devkit of the default image, a temporary HOME

Each command runs --runs times (after one warm-up); the median and min wall times are printed.
With --old-src DIR (a `src` folder of another checkout, e.g. `git archive main src`), the
flowsession commands also run with that code first on PYTHONPATH: before/after in one run.

    .venv/bin/python bench/cli_start.py [--runs 15] [--old-src /tmp/old/src] [--no-pf]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

PY = REPO / ".venv/bin/python"
FS = [str(PY), "-c", "from flowsession.cli.main import app; app()"]


def timed(cmd: list[str], env: dict, runs: int) -> tuple[float, float]:
    walls = []
    for i in range(runs + 1):
        t0 = time.perf_counter()
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if p.returncode not in (0, 1):  # `run show` of a missing run exits 1 (not found)
            raise SystemExit(f"{' '.join(cmd)}: exit {p.returncode}\n{p.stderr[-2000:]}")
        if i:
            walls.append(wall)
    return statistics.median(walls), min(walls)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--old-src", type=Path, help="another checkout's src folder: before/after")
    ap.add_argument("--no-pf", action="store_true", help="skip prompt flow's pf")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="fs-bench-cli-"))
    env = {k: v for k, v in os.environ.items() if k not in ("FLOWSESSION_URL",
                                                           "FLOWSESSION_TOKEN", "PYTHONPATH")}
    env.update(FLOWSESSION_HOME=str(tmp / "home"), FLOWSESSION_STANDBY_POOL="0")
    cases = [("--help", ["--help"]), ("run list", ["run", "list", "--json"]),
             ("run show", ["run", "show", "no-such-run", "--json"])]
    variants = [("flowsession", env)]
    if args.old_src:
        variants.insert(0, ("flowsession (old)", {**env, "PYTHONPATH": str(args.old_src)}))
    subprocess.run([*FS, "server", "start"], env=env, check=True, capture_output=True)
    rows = []
    try:
        for label, cmd in cases:
            for who, e in variants:
                med, low = timed([*FS, *cmd], e, args.runs)
                rows.append((f"{who} {label}", med, low))
        if not args.no_pf:
            from flowsession.config import Settings
            from flowsession.environments.images import DEFAULT_IMAGE
            from flowsession.environments.service import EnvironmentService
            from flowsession.store import open_store

            base = Settings.from_env()
            settings = replace(base, home=tmp / "img-home", images_path=base.images_dir,
                               database_url=None)
            image = asyncio.run(EnvironmentService(settings, open_store(settings.db_url))
                                .images.ensure_built(DEFAULT_IMAGE))
            pf = [str(Path(image.path) / "bin" / "python"), "-m", "promptflow._cli._pf.entry"]
            (tmp / "pf-home").mkdir()
            pf_env = {**os.environ, "HOME": str(tmp / "pf-home")}
            subprocess.run([*pf, "config", "set", "telemetry.enabled=false"], env=pf_env,
                           capture_output=True)
            for label, cmd in (("--help", ["--help"]), ("run list", ["run", "list"])):
                med, low = timed([*pf, *cmd], pf_env, args.runs)
                rows.append((f"pf {label}", med, low))
    finally:
        subprocess.run([*FS, "server", "stop"], env=env, capture_output=True)
    print(f"command: {' '.join([sys.executable, *sys.argv])}   ({args.runs} runs each, "
          f"{os.cpu_count()} cores)")
    print(f"{'command':32} {'median s':>9} {'min s':>7}")
    for name, med, low in rows:
        print(f"{name:32} {med:9.3f} {low:7.3f}")


if __name__ == "__main__":
    main()

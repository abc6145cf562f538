"""Benchmark: how fast a flow gets its environment.

For a flow with three small packages (humanize, xmltodict, termcolor) over the default image:

  (a) a new environment, warm package cache: snapshot + resolve + build, in a fresh home
  (b) the same environment again: a cache hit (in-process call, and the whole CLI command)
  (c) the peer: `python -m venv` + `pip install promptflow-core promptflow-tools` + the three
      packages, pip's cache warm: what a user does by hand to get an equal environment

Prints each figure (median of the runs) and the ratios a/c and b/c.
Targets: a <= c/20; b under 50 ms.

    .venv/bin/python bench/env_build.py [--runs-a 5] [--runs-b 30] [--runs-c 2]

Uses PyPI for the packages (warm caches: the first run of each kind is not counted).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from flowsession.config import Settings  # noqa: E402
from flowsession.environments.images import DEFAULT_IMAGE  # noqa: E402
from flowsession.environments.service import EnvironmentService  # noqa: E402
from flowsession.store import open_store  # noqa: E402

PACKAGES = ["humanize", "xmltodict", "termcolor"]
IMAGE_LOCK = REPO / "src/flowsession/environments/builtin_images/runtime/1.lock"


def make_flow(root: Path) -> Path:
    flow = root / "bench-flow"
    flow.mkdir(parents=True)
    (flow / "flow.dag.yaml").write_text(
        "environment:\n  python_requirements_txt: requirements.txt\n"
        "inputs:\n  x:\n    type: string\noutputs:\n  y:\n    type: string\n"
        "    reference: ${echo.output}\nnodes:\n- name: echo\n  type: python\n"
        "  source:\n    type: code\n    path: echo.py\n  inputs:\n    x: ${inputs.x}\n")
    (flow / "echo.py").write_text("from promptflow.core import tool\n\n\n@tool\n"
                                  "def echo(x: str) -> str:\n    return x\n")
    (flow / "requirements.txt").write_text("\n".join(PACKAGES) + "\n")
    return flow


def service_in(home: Path, base: Settings) -> EnvironmentService:
    settings = replace(base, home=home, images_path=base.images_dir, database_url=None)
    return EnvironmentService(settings, open_store(settings.db_url))


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_new_env(base: Settings, flow: Path, tmp: Path, runs: int) -> tuple[list[float], str]:
    """(a): every run in a fresh home — nothing resolved or built before, caches warm."""
    times, env_id = [], ""
    for i in range(runs + 1):
        svc = service_in(tmp / f"home-a{i}", base)
        t = timed(lambda: asyncio.run(svc.ensure_for_flow(flow)))
        env_id = svc.cache.list()[0].id
        if i:  # the first run warms uv's cache
            times.append(t)
        svc.store.engine.dispose()
    return times, env_id


def bench_cache_hit(base: Settings, flow: Path, tmp: Path, runs: int) -> tuple[list[float], list[float]]:
    """(b): the same environment again, in-process and through the installed CLI."""
    home = tmp / "home-b"
    svc = service_in(home, base)
    asyncio.run(svc.ensure_for_flow(flow))
    calls = [timed(lambda: asyncio.run(svc.ensure_for_flow(flow))) for _ in range(runs)]
    env = {**os.environ, "FLOWSESSION_HOME": str(home), "FLOWSESSION_IMAGES_DIR": str(base.images_dir)}
    exe = REPO / ".venv/bin/flowsession"
    # the CLI speaks to the home's local server: started once, before the timings
    subprocess.run([str(exe), "server", "start"], env=env, check=True, capture_output=True)
    try:
        cli = [timed(lambda: subprocess.run([str(exe), "env", "build", str(flow)], env=env,
                                            check=True, capture_output=True)) for _ in range(5)]
    finally:
        subprocess.run([str(exe), "server", "stop"], env=env, capture_output=True)
    return calls, cli


def bench_pip(flow: Path, tmp: Path, runs: int) -> list[float]:
    """(c): python -m venv + pip install promptflow-core promptflow-tools + the packages."""
    pins = [line.split(" ")[0] for line in IMAGE_LOCK.read_text().splitlines()
            if line.startswith(("promptflow-core==", "promptflow-tools=="))]
    python = getattr(sys, "_base_executable", sys.executable)
    times = []
    for i in range(runs + 1):
        venv = tmp / f"pip-venv-{i}"

        def build():
            subprocess.run([python, "-m", "venv", str(venv)], check=True)
            subprocess.run([str(venv / "bin/pip"), "install", "--quiet", "--disable-pip-version-check",
                            *pins, *PACKAGES], check=True, capture_output=True)

        t = timed(build)
        if i:  # the first run warms pip's cache
            times.append(t)
        shutil.rmtree(venv)
    return times


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs-a", type=int, default=5)
    parser.add_argument("--runs-b", type=int, default=30)
    parser.add_argument("--runs-c", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("UV_PYTHON_DOWNLOADS", "never")
    base = Settings.from_env()
    print(f"building/finding the default image in {base.images_dir} ...", flush=True)
    svc = service_in(Path(tempfile.mkdtemp(prefix="fs-bench-img-")), base)
    asyncio.run(svc.images.ensure_built(DEFAULT_IMAGE))

    with tempfile.TemporaryDirectory(prefix="fs-bench-") as t:
        tmp = Path(t)
        flow = make_flow(tmp)
        print(f"flow: {', '.join(PACKAGES)} over {DEFAULT_IMAGE}; "
              f"{os.cpu_count()} cores; uv {subprocess.run([base.uv, '--version'], capture_output=True, text=True).stdout.split()[1]}",
              flush=True)
        a, env_id = bench_new_env(base, flow, tmp, args.runs_a)
        b, b_cli = bench_cache_hit(base, flow, tmp, args.runs_b)
        c = bench_pip(flow, tmp, args.runs_c)

    a_m, b_m, c_m = statistics.median(a), statistics.median(b), statistics.median(c)
    print()
    print(f"(a) new environment, warm cache      {ms(a_m)}  (median of {len(a)}; "
          f"min {ms(min(a)).strip()}, max {ms(max(a)).strip()}); env_id {env_id}")
    print(f"(b) same environment again (hit)     {ms(b_m)}  (median of {len(b)}, in-process "
          f"EnvironmentService.ensure_for_flow; p95 {ms(sorted(b)[int(len(b) * .95) - 1]).strip()})")
    print(f"    the same through the CLI         {ms(statistics.median(b_cli))}  (median of "
          f"{len(b_cli)}: `flowsession env build FLOW`, interpreter start-up included)")
    print(f"(c) python -m venv + pip install     {ms(c_m)}  (median of {len(c)}, pip cache warm)")
    print()
    print(f"a/c = {a_m / c_m:.4f}  (1/{c_m / a_m:.0f}; target <= 1/20)   "
          f"{'PASS' if a_m <= c_m / 20 else 'MISS'}")
    print(f"b/c = {b_m / c_m:.5f}  (1/{c_m / b_m:.0f}); b = {b_m * 1000:.1f} ms (target < 50 ms)   "
          f"{'PASS' if b_m < 0.050 else 'MISS'}")


if __name__ == "__main__":
    main()

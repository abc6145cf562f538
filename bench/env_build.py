"""Benchmark: how fast a flow gets its environment, whole command against whole command.

For a flow with three small packages (humanize, xmltodict, termcolor) over the default image.
The headline compares whole commands:

  (a) `flowsession env build FLOW`: a new environment, warm package cache, in a fresh home
      (its real local server started by `flowsession server start`, not counted): snapshot +
      resolve + build through the CLI and the server
  (b) `flowsession env build FLOW` again: the same environment, a cache hit
  (c) the peer: `python -m venv V` then `V/bin/pip install promptflow-core promptflow-tools`
      + the three packages, pip's cache warm: what a user does by hand to get an equal
      environment (the two commands' wall time together)

Ratios a/c and b/c. Targets: a <= c/20.

Beside it, in-process (EnvironmentService.ensure_for_flow in this process: no interpreter
start-up, no HTTP; no in-process peer, so no ratio): a new environment and a cache hit
(target for the hit: under 50 ms).

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
sys.path.insert(0, str(REPO / "bench"))

from _common import cli_env, fs, load, machine_cores, server_start, server_stop  # noqa: E402

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


def bench_cache_hit(base: Settings, flow: Path, tmp: Path, runs: int) -> list[float]:
    """(b) in-process: the same environment again."""
    svc = service_in(tmp / "home-b", base)
    asyncio.run(svc.ensure_for_flow(flow))
    return [timed(lambda: asyncio.run(svc.ensure_for_flow(flow))) for _ in range(runs)]


def bench_cli(base: Settings, flow: Path, tmp: Path, runs_a: int,
              runs_b: int) -> tuple[list[float], list[float]]:
    """(a) and (b) as whole commands: `flowsession env build FLOW`, each (a) in a fresh home
    with its own local server; (b) in the last one."""
    a, b, env = [], [], None
    for i in range(runs_a + 1):
        env = cli_env(tmp / f"cli-home-{i}", base.images_dir)
        server_start(env)
        try:
            t, _ = fs(env, tmp, "env", "build", str(flow))
            if i:  # the first run warms uv's cache
                a.append(t)
            if i == runs_a:
                b = [fs(env, tmp, "env", "build", str(flow))[0] for _ in range(runs_b)]
        finally:
            server_stop(env, tmp)
    return a, b


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
        uv = subprocess.run([base.uv, "--version"], capture_output=True, text=True).stdout
        print(f"flow: {', '.join(PACKAGES)} over {DEFAULT_IMAGE}; {machine_cores()} cores; "
              f"uv {uv.split()[1]}", flush=True)
        cli_a, cli_b = bench_cli(base, flow, tmp, args.runs_a, max(5, args.runs_b // 3))
        c = bench_pip(flow, tmp, args.runs_c)
        a, env_id = bench_new_env(base, flow, tmp, args.runs_a)
        b = bench_cache_hit(base, flow, tmp, args.runs_b)

    med = statistics.median
    a_m, b_m, c_m = med(cli_a), med(cli_b), med(c)
    print(f"\nenvironments, whole commands; {machine_cores()} cores; {load()}\n")
    print(f"(a) flowsession env build, new env   {ms(a_m)}  (median of {len(cli_a)}, a fresh "
          f"home each, uv cache warm; min {ms(min(cli_a)).strip()}, max "
          f"{ms(max(cli_a)).strip()})")
    print(f"(b) flowsession env build, again     {ms(b_m)}  (median of {len(cli_b)}: a cache "
          "hit, interpreter start-up included)")
    print(f"(c) python -m venv + pip install     {ms(c_m)}  (median of {len(c)}, pip cache warm)")
    print()
    print(f"a/c = {a_m / c_m:.4f}  (1/{c_m / a_m:.1f}; target <= 1/20)   "
          f"{'PASS' if a_m <= c_m / 20 else 'MISS'}")
    print(f"b/c = {b_m / c_m:.5f}  (1/{c_m / b_m:.0f})")
    print("\nbeside it, in-process (EnvironmentService.ensure_for_flow in this process: no "
          "interpreter start-up, no HTTP; no in-process peer, so no ratio)")
    print(f"    new environment, warm cache      {ms(med(a))}  (median of {len(a)}; env_id "
          f"{env_id})")
    print(f"    same environment again (hit)     {ms(med(b))}  (median of {len(b)}; p95 "
          f"{ms(sorted(b)[int(len(b) * .95) - 1]).strip()}; target < 50 ms)   "
          f"{'PASS' if med(b) < 0.050 else 'MISS'}")


if __name__ == "__main__":
    main()

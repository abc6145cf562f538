"""Benchmark: how fast sessions start, reset, install, and answer a test line.

For examples/flows/hello (one python node; requirements: humanize), measured in the same run.
The headline compares whole commands with whole commands: `flowsession` commands go through
the CLI and this home's real local server (started by `flowsession server start`, not
counted), FLOWSESSION_STANDBY_POOL=0:

  floor      `python -c "import promptflow.core"` in the flow's own environment (its fastest
             run, measured between the warm starts: the ratios are the least flattering)
  cold       `flowsession session start FLOW`, a new environment (a fresh home, uv's package
             cache warm)                                              target <= 1.5x floor
  warm       `flowsession session start FLOW` after `session stop`: the environment exists
                                                                      target <= 1.2x floor
  test       `flowsession flow test FLOW --inputs name=Ada` on the running session (warm)
             against `pf flow test --flow FLOW --inputs name=Ada` (promptflow-devkit in the
             flow's environment)                                      target <= 1/20 of pf

Beside it, in-process (SessionService calls in this process: no interpreter start-up, no
HTTP; there is no in-process peer, so no ratio): cold, warm and standby starts (a supervisor
adopted from the pool), reset (no standby; with the pool), Save and install of one small
package, and the `flow test` service call.

    .venv/bin/python bench/session_start.py [--runs 3]

Uses PyPI for the flow's packages; the default image is built first if needed.
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

from _common import cli_env, fs, load, machine_cores, pf_argv, server_start  # noqa: E402
from _common import server_stop  # noqa: E402

from flowsession.backends.compute.local import LocalBackend  # noqa: E402
from flowsession.computes.service import ComputeService  # noqa: E402
from flowsession.config import Settings  # noqa: E402
from flowsession.environments.images import DEFAULT_IMAGE  # noqa: E402
from flowsession.environments.service import EnvironmentService  # noqa: E402
from flowsession.sessions.service import SessionService  # noqa: E402
from flowsession.store import open_store  # noqa: E402
from flowsession.worker import protocol  # noqa: E402

USER = "bench"
EXTRA_PACKAGES = ["xmltodict", "termcolor", "inflect", "emoji", "wcwidth", "art"]


def service(base: Settings, home: Path, pool: int) -> SessionService:
    settings = replace(base, home=home, images_path=base.images_dir, database_url=None,
                       standby_pool_size=pool, runtime_path=None)
    store = open_store(settings.db_url)
    backend = LocalBackend(settings)
    return SessionService(settings, store, envs=EnvironmentService(settings, store),
                          computes=ComputeService(settings, store, backend), backend=backend)


def timed(coro_fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = asyncio.run(coro_fn())
    return time.perf_counter() - t0, result


def wait_standby(svc: SessionService) -> None:
    for handle in svc.pool.members():
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if protocol.request(handle.ref["socket"], {"op": "ping"}, 5).get("phase") == "standby":
                    break
            except OSError:
                pass
            time.sleep(0.05)


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def fmt(seconds: float) -> str:
    return f"{seconds * 1000:8.1f} ms"


def cmd_time(argv: list[str], env: dict | None = None, cwd: Path | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, env=env, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - t0


def cli_part(base: Settings, tmp: Path, flow: Path, runs: int, floor: list[float],
             results: dict[str, list[float]]) -> Path:
    """The whole commands; returns the environment's python (of the last cold home)."""
    homes = []
    try:
        for i in range(runs):
            env = cli_env(tmp / f"cli-home-{i}", base.images_dir, FLOWSESSION_USER=USER,
                          FLOWSESSION_STANDBY_POOL="0")
            homes.append(env)
            server_start(env)
            results["cli_cold"].append(fs(env, tmp, "session", "start", str(flow))[0])
        env = homes[-1]
        _, shown = fs(env, tmp, "session", "show", str(flow), "--json")
        _, shown_env = fs(env, tmp, "env", "show", shown["env_id"], "--json")
        python = Path(shown_env["path"]) / "bin" / "python"
        for _ in range(runs):  # the floor is measured between the starts it is compared to
            fs(env, tmp, "session", "stop", str(flow))
            floor.append(cmd_time([str(python), "-c", "import promptflow.core"]))
            results["cli_warm"].append(fs(env, tmp, "session", "start", str(flow))[0])
        for _ in range(max(5, runs)):
            t, out = fs(env, tmp, "flow", "test", str(flow), "--inputs", "name=Ada")
            if "Ada" not in str(out):
                raise SystemExit(f"flowsession flow test answered {out!r}")
            results["cli_test"].append(t)
    finally:
        for env in homes:
            server_stop(env, tmp, [flow])
    return python


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("UV_PYTHON_DOWNLOADS", "never")
    base = Settings.from_env()
    tmp = Path(tempfile.mkdtemp(prefix="fs-bench-sessions-"))
    flow = tmp / "hello"
    shutil.copytree(REPO / "examples/flows/hello", flow)
    for p in flow.rglob("*"):
        p.chmod(0o644 if p.is_file() else 0o755)
    cli_flow = tmp / "hello-cli"
    shutil.copytree(flow, cli_flow)
    results: dict[str, list[float]] = {k: [] for k in (
        "cold", "warm", "standby", "reset", "reset_pool", "install", "test",
        "cli_cold", "cli_warm", "cli_test")}
    floor: list[float] = []
    try:
        svc = service(base, tmp / "home-0", pool=0)
        asyncio.run(svc.envs.images.ensure_built(DEFAULT_IMAGE))
        asyncio.run(svc.start(flow, user=USER))  # warms uv's cache and the page cache
        asyncio.run(svc.stop(flow, user=USER))

        # --- the headline: whole commands ---------------------------------------------------
        python = cli_part(base, tmp, cli_flow, args.runs, floor, results)
        peer_flow = tmp / "peer-hello"
        shutil.copytree(flow, peer_flow)
        pf = []
        for _ in range(max(3, args.runs)):
            t0 = time.perf_counter()
            out = subprocess.run([*pf_argv(python), "flow", "test", "--flow", str(peer_flow),
                                  "--inputs", "name=Ada"], cwd=tmp, capture_output=True,
                                 text=True, check=True).stdout
            pf.append(time.perf_counter() - t0)
            if "Ada" not in out:
                raise SystemExit(f"pf flow test answered {out!r}")

        # --- beside it: in-process ------------------------------------------------------------
        for i in range(args.runs):
            cold = service(base, tmp / f"home-cold-{i}", pool=0)
            t, _ = timed(lambda: cold.start(flow, user=USER))
            results["cold"].append(t)
            asyncio.run(cold.stop(flow, user=USER))

        warm = service(base, tmp / "home-cold-0", pool=0)
        for _ in range(args.runs):
            t, session = timed(lambda: warm.start(flow, user=USER))
            results["warm"].append(t)
            t, _ = timed(lambda: warm.reset(flow, user=USER))
            results["reset"].append(t)
            asyncio.run(warm.stop(flow, user=USER))

        pooled = service(base, tmp / "home-cold-0", pool=1)
        for _ in range(args.runs):
            asyncio.run(pooled.pool.fill())
            wait_standby(pooled)
            t, session = timed(lambda: pooled.start(flow, user=USER))
            assert session.session_handle.from_standby
            results["standby"].append(t)
            asyncio.run(pooled.pool.fill())
            wait_standby(pooled)
            t, _ = timed(lambda: pooled.reset(flow, user=USER))
            results["reset_pool"].append(t)
            asyncio.run(pooled.stop(flow, user=USER))

        asyncio.run(pooled.pool.fill())
        wait_standby(pooled)
        asyncio.run(pooled.start(flow, user=USER))
        for i in range(args.runs):
            asyncio.run(pooled.pool.fill())
            wait_standby(pooled)
            (flow / "requirements.txt").write_text(f"humanize\n{EXTRA_PACKAGES[i]}\n")
            t, _ = timed(lambda: pooled.install(flow, user=USER))
            results["install"].append(t)
        for _ in range(50):
            t, _ = timed(lambda: pooled.test(flow, {"name": "Ada"}, user=USER))
            results["test"].append(t)
        asyncio.run(pooled.stop(flow, user=USER))
        asyncio.run(pooled.pool.drain())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(args, results, floor, pf, LocalBackend(base).bwrap is not None)


def report(args, results: dict, floor: list[float], pf: list[float], sandboxed: bool) -> None:
    # the floor's fastest run: the ratios are then the least flattering ones
    f, p = min(floor), med(pf)
    r = {k: med(v) for k, v in results.items() if v}
    print(f"\nsessions of examples/flows/hello, {machine_cores()} cores, median of {args.runs} "
          f"(flowsession flow test: of {len(results['cli_test'])}; pf: of {len(pf)}); "
          f"sandbox: {sandboxed}; {load()}\n")
    print("whole commands (flowsession: the CLI through a real local server, no standby pool)")
    floor_label = 'floor: python -c "import promptflow.core"'
    print(f"{floor_label:44s}{fmt(f)}  (fastest of "
          f"{len(floor)}; median {fmt(med(floor)).strip()})")
    for key, label, target in (("cli_cold", "flowsession session start, cold (new env)", 1.5),
                               ("cli_warm", "flowsession session start, warm", 1.2)):
        ratio = r[key] / f
        print(f"{label:44s}{fmt(r[key])}   {ratio:5.2f}x floor  (target <= {target}x)  "
              f"{'PASS' if ratio <= target else 'MISS'}")
    print(f"{'pf flow test --flow F --inputs name=Ada':44s}{fmt(p)}")
    ratio = r["cli_test"] / p
    print(f"{'flowsession flow test F --inputs name=Ada':44s}{fmt(r['cli_test'])}   "
          f"1/{p / r['cli_test']:.1f} of pf  (target <= 1/20)  "
          f"{'PASS' if ratio <= 1 / 20 else 'MISS'}")
    print("\nbeside it, in-process (SessionService calls in this process: no interpreter "
          "start-up, no HTTP; no in-process peer, so no ratio)")
    for key, label in (("cold", "start, cold (new env), no standby"),
                       ("warm", "start, warm, no standby"),
                       ("standby", "start from the standby pool"),
                       ("reset", "reset (no standby)"), ("reset_pool", "reset (standby pool)"),
                       ("install", "Save and install (+1 package)"),
                       ("test", "flow test, the service call (of 50)")):
        print(f"{'  ' + label:44s}{fmt(r[key])}")


if __name__ == "__main__":
    main()

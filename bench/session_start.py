"""Benchmark: how fast sessions start, reset, install, and answer a test line.

For examples/flows/hello (one python node; requirements: humanize), each figure is printed
beside its comparison, measured in the same run:

  floor      `python -c "import promptflow.core"` in the flow's own environment (its fastest
             run, measured between the warm starts: the ratios are the least flattering)
  cold       session start, new environment (warm package cache), no standby   target <= 1.5x floor
  warm       session start, the environment exists, no standby                   target <= 1.2x floor
  standby    session start adopting a standby supervisor from the pool           target <= 0.25x floor
  reset      session reset (no standby; and with the pool)
  install    Save and install of one small package (a new environment, warm cache)
  test       `flow test` on a running session: the service call (as the API makes it), and
             the whole `flowsession flow test` command; against `pf flow test` (promptflow-devkit)
             target <= 1/20 of pf

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
    results: dict[str, list[float]] = {k: [] for k in (
        "cold", "warm", "standby", "reset", "reset_pool", "install", "test", "test_cli")}
    try:
        svc = service(base, tmp / "home-0", pool=0)
        asyncio.run(svc.envs.images.ensure_built(DEFAULT_IMAGE))
        asyncio.run(svc.start(flow, user=USER))  # warms uv's cache and the page cache
        asyncio.run(svc.stop(flow, user=USER))

        for i in range(args.runs):
            cold = service(base, tmp / f"home-cold-{i}", pool=0)
            t, _ = timed(lambda: cold.start(flow, user=USER))
            results["cold"].append(t)
            asyncio.run(cold.stop(flow, user=USER))

        warm = service(base, tmp / "home-cold-0", pool=0)
        env = warm.envs.cache.list()[0]
        floor = []
        for _ in range(args.runs):  # the floor is measured between the starts it is compared to
            floor.append(cmd_time([str(env.python), "-c", "import promptflow.core"]))
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
        cli_env = {**os.environ, "FLOWSESSION_HOME": str(tmp / "home-cold-0"),
                   "FLOWSESSION_IMAGES_DIR": str(base.images_dir), "FLOWSESSION_USER": USER,
                   "FLOWSESSION_STANDBY_POOL": "1"}
        exe = str(REPO / ".venv/bin/flowsession")
        # the CLI speaks to the home's local server: started once, before the timings
        cmd_time([exe, "server", "start"], env=cli_env)
        try:
            results["test_cli"] = [cmd_time([exe, "flow", "test", str(flow), "--inputs",
                                             "name=Ada"], env=cli_env) for _ in range(5)]
        finally:
            cmd_time([exe, "server", "stop"], env=cli_env)
        peer_flow = tmp / "peer-hello"
        shutil.copytree(flow, peer_flow)
        env = pooled.envs.cache.get(pooled.records.list(owner=USER)[0].env_id)
        pf = [cmd_time([str(env.python), "-m", "promptflow._cli._pf.entry", "flow", "test",
                        "--flow", str(peer_flow), "--inputs", "name=Ada"], cwd=tmp)
              for _ in range(args.runs)]
        asyncio.run(pooled.stop(flow, user=USER))
        asyncio.run(pooled.pool.drain())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    # the floor's fastest run: the ratios are then the least flattering ones
    f, p = min(floor), med(pf)
    r = {k: med(v) for k, v in results.items() if v}
    print(f"\nsessions of examples/flows/hello, {os.cpu_count()} cores, median of {args.runs} "
          f"(test: of 50); sandbox: {LocalBackend(base).bwrap is not None}\n")
    print(f"floor: import promptflow.core     {fmt(f)}  (fastest of {len(floor)}; median "
          f"{fmt(med(floor)).strip()})")
    for key, label, target in (("cold", "cold start (new env)", 1.5), ("warm", "warm start", 1.2),
                               ("standby", "start from standby pool", 0.25)):
        ratio = r[key] / f
        print(f"{label:34s}{fmt(r[key])}   {ratio:5.2f}x floor  (target <= {target}x)  "
              f"{'PASS' if ratio <= target else 'MISS'}")
    print(f"{'reset (no standby)':34s}{fmt(r['reset'])}   {r['reset'] / f:5.2f}x floor")
    print(f"{'reset (standby pool)':34s}{fmt(r['reset_pool'])}   {r['reset_pool'] / f:5.2f}x floor")
    print(f"{'Save and install (+1 package)':34s}{fmt(r['install'])}")
    print(f"\npf flow test (promptflow-devkit)  {fmt(p)}")
    ratio = r["test"] / p
    print(f"{'flow test, running session':34s}{fmt(r['test'])}   1/{p / r['test']:.0f} of pf  "
          f"(target <= 1/20)  {'PASS' if ratio <= 1 / 20 else 'MISS'}")
    print(f"{'  the whole CLI command':34s}{fmt(r['test_cli'])}   1/{p / r['test_cli']:.1f} of pf "
          "(interpreter start-up and imports included)")


if __name__ == "__main__":
    main()

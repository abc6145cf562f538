"""Benchmark: the local backend and a Ray cluster on this machine, side by side.

For each backend, through the same services (``SessionService``, ``RunService``), with the
standby pool off:

  start        a session start of tests/flows/echo with default settings: the first one
               (its environment is built: on the control plane for local, on the node for Ray)
               and then --starts more (the environment is cached), each stopped before the
               next; the call to ``SessionService.start`` until it returns RUNNING.
  echo 10k     a batch run of 10,000 lines of tests/flows/echo on an already running session
               (a 10-line warm-up run first, not counted), VM size ``b2`` (2 vCPU), its default
               workers (2): from ``RunService.create`` to Completed; checked line by line.
  latency 1k   1,000 lines of a python node that sleeps 100 ms, --latency-workers workers (8),
               on a running session (a 10-line warm-up run starts it): on a VM size with that
               many vCPUs (``b8``: one supervisor) and, for Ray, on ``b2`` too, where the run
               asks for more workers than its compute has vCPUs and spreads over helper actors
               (4 supervisors; each run starts its helpers) on the cluster's nodes. The floor
               is 1,000 x 0.1 s / workers.

The Ray half runs on a cluster this script starts on 127.0.0.1 (tests/helpers/ray_cluster.py:
a head with 2 CPUs and nodes b and c with 8 CPUs each -- logical CPUs; this machine's cores
are shared by all of them) inside a loopback-only network namespace (tests/helpers/netns.py),
so the script re-executes itself there for that half. The default image is built first, on
this side (it needs the package index): the cluster's nodes adopt it from its folder, and build
the flows' environments themselves.

    .venv/bin/python bench/ray_batch.py [--runs 1] [--starts 3] [--lines 10000]
                                        [--latency-lines 1000] [--latency-workers 8]
                                        [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
sys.path.insert(0, str(REPO / "tests"))

from flowsession.config import Settings  # noqa: E402
from flowsession.environments.images import DEFAULT_IMAGE  # noqa: E402
from flowsession.environments.service import EnvironmentService  # noqa: E402
from flowsession.runs import records as R  # noqa: E402
from flowsession.runs.service import RunService  # noqa: E402
from flowsession.runs.spec import RunSpec  # noqa: E402
from flowsession.sessions.options import StartOptions  # noqa: E402
from flowsession.sessions.service import SessionService  # noqa: E402
from flowsession.store import open_store  # noqa: E402

USER = "bench"
ECHO = REPO / "tests/flows/echo"
SIZES = ('[b2]\nvcpu = 2\nmemory_gb = 2\n\n[b8]\nvcpu = 8\nmemory_gb = 4\n')
LATENCY_YAML = """inputs:
  text:
    type: string
outputs:
  out:
    type: string
    reference: ${nap.output}
nodes:
- name: nap
  type: python
  source:
    type: code
    path: nap.py
  inputs:
    text: ${inputs.text}
"""
LATENCY_TOOL = """import time

from promptflow.core import tool


@tool
def nap(text: str) -> str:
    time.sleep(0.1)
    return text
"""
GiB = 1 << 30


def load() -> str:
    return "load " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def write_data(path: Path, n: int) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"line {i}"}) + "\n")
    return path


def check(svc: RunService, run, n: int) -> None:
    if run.status != R.RunStatus.COMPLETED or run.completed != n or run.failed:
        raise SystemExit(f"run {run.name}: {run.status} {run.completed}/{n} "
                         f"({run.failed} failed) {run.error}")
    rows = [json.loads(x) for x in (svc.files(run.name).root / "outputs.jsonl").open()]
    if len(rows) != n or any(r["out"] != f"line {r['line_number']}" for r in rows):
        raise SystemExit(f"run {run.name}: outputs.jsonl is not the {n} lines echoed")
    stored = [json.loads(x)["i"] for x in (svc.files(run.name).root / "lines.jsonl").open()]
    if sorted(stored) != list(range(n)):
        raise SystemExit(f"run {run.name}: a line was stored twice or not at all")


# --- one backend ------------------------------------------------------------------------------

async def measure(settings: Settings, tmp: Path, args) -> dict:
    sessions = SessionService.open(settings)
    svc = RunService.open(settings, sessions=sessions)
    echo, nap = tmp / "echo", tmp / "latency"
    shutil.copytree(ECHO, echo)
    nap.mkdir()
    (nap / "flow.dag.yaml").write_text(LATENCY_YAML)
    (nap / "nap.py").write_text(LATENCY_TOOL)
    data = {n: write_data(tmp / f"d{n}.jsonl", n)
            for n in {10, args.lines, args.latency_lines}}
    out: dict = {"backend": settings.backend, "start_s": [], "echo": [], "latency": {}}
    b2 = StartOptions(vm_size="b2")
    try:
        for i in range(1 + args.starts):
            t0 = time.perf_counter()
            session = await sessions.start(echo, user=USER, options=b2)
            took = time.perf_counter() - t0
            assert session.state == "RUNNING", session.reason
            (out.__setitem__("first_start_s", took) if i == 0 else out["start_s"].append(took))
            print(f"  {settings.backend}: session start {'(first) ' if i == 0 else ''}"
                  f"{took:.2f} s  {load()}", flush=True)
            await sessions.stop(echo, user=USER)
        warm = await svc.create(RunSpec(flow=str(echo), data=str(data[10]),
                                        resources={"instance_type": "b2"}), user=USER)
        check(svc, await svc.wait(warm.name, user=USER), 10)
        for i in range(args.runs):
            t0 = time.perf_counter()
            run = await svc.create(RunSpec(flow=str(echo), data=str(data[args.lines]),
                                           resources={"instance_type": "b2"}), user=USER)
            run = await svc.wait(run.name, user=USER)
            wall = time.perf_counter() - t0
            check(svc, run, args.lines)
            out["echo"].append(wall)
            print(f"  {settings.backend}: echo {args.lines:,} lines {wall:.2f} s "
                  f"({args.lines / wall:.0f} lines/s)  {load()}", flush=True)
        await sessions.stop(echo, user=USER)
        shapes = ["b8"] + (["b2"] if settings.backend == "ray" else [])
        for shape in shapes:
            out["latency"][shape] = []
            warm = await svc.create(RunSpec(flow=str(nap), data=str(data[10]),
                                            resources={"instance_type": shape}), user=USER)
            check(svc, await svc.wait(warm.name, user=USER), 10)  # the session starts
            for i in range(args.runs):
                t0 = time.perf_counter()
                run = await svc.create(RunSpec(
                    flow=str(nap), data=str(data[args.latency_lines]),
                    workers=args.latency_workers, resources={"instance_type": shape}),
                    user=USER)
                run = await svc.wait(run.name, user=USER)
                wall = time.perf_counter() - t0
                check(svc, run, args.latency_lines)
                out["latency"][shape].append(wall)
                print(f"  {settings.backend}: latency-bound {args.latency_lines:,} lines on "
                      f"{shape}, {args.latency_workers} workers: {wall:.2f} s  {load()}",
                      flush=True)
            await sessions.stop(nap, user=USER)
    finally:
        for flow in (echo, nap):
            try:
                await sessions.stop(flow, user=USER)
            except Exception:  # noqa: BLE001 - not running
                pass
    return out


def bench_settings(tmp: Path, images: Path, backend: str, address: str | None) -> Settings:
    sizes = tmp / "sizes.toml"
    sizes.write_text(SIZES)
    return replace(Settings.from_env(), home=tmp / "home", images_path=images,
                   database_url=None, standby_pool_size=0, runtime_path=None,
                   vm_sizes_file=sizes, default_vm_size="b2", idle_timeout_s=3600,
                   backend=backend, ray_address=address, vcpu_quota=64)


def local_half(images: Path, args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="fs-bench-rb-local-"))
    try:
        return asyncio.run(measure(bench_settings(tmp, images, "local", None), tmp, args))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ray_half(images: Path, args) -> dict:
    """Inside the namespace: a cluster of our own, then the same measures."""
    from helpers.ray_cluster import RayCluster

    tmp = Path(tempfile.mkdtemp(prefix="fs-bench-rb-ray-"))

    def node_env(name: str) -> dict[str, str]:
        return {"FLOWSESSION_NODE_HOME": str(tmp / "nodes" / name),
                "FLOWSESSION_IMAGES_DIR": str(images), "UV_PYTHON_DOWNLOADS": "never"}

    t0 = time.perf_counter()
    cluster = RayCluster(head_cpus=2, head_memory=4 * GiB, node_env=node_env)
    try:
        cluster.add_node("b", cpus=8, memory=8 * GiB)
        cluster.add_node("c", cpus=8, memory=8 * GiB)
        up = time.perf_counter() - t0
        print(f"  ray cluster at {cluster.address}: 3 nodes up in {up:.1f} s", flush=True)
        out = asyncio.run(measure(bench_settings(tmp, images, "ray", cluster.address), tmp,
                                  args))
        out["cluster_up_s"] = up
        return out
    finally:
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)


# --- figures ----------------------------------------------------------------------------------

def med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def report(local: dict, ray: dict, args) -> dict:
    def row(label: str, a: float | None, b: float | None, unit: str = "s") -> None:
        ratio = f"{b / a:8.2f}" if a and b else f"{'':8s}"
        fa = f"{a:10.2f} {unit}" if a is not None else f"{'n/a':>12s}"
        fb = f"{b:10.2f} {unit}" if b is not None else f"{'n/a':>12s}"
        print(f"{label:46s}{fa}{fb}  {ratio}")

    n, m, w = args.lines, args.latency_lines, args.latency_workers
    floor = m * 0.1 / w
    fig = {
        "first_start_s": {"local": local.get("first_start_s"), "ray": ray.get("first_start_s")},
        "start_s": {"local": med(local["start_s"]), "ray": med(ray["start_s"])},
        "echo_s": {"local": med(local["echo"]), "ray": med(ray["echo"])},
        "latency_b8_s": {"local": med(local["latency"].get("b8", [])),
                         "ray": med(ray["latency"].get("b8", []))},
        "latency_b2_spread_s": {"ray": med(ray["latency"].get("b2", []))},
        "latency_floor_s": floor, "raw": {"local": local, "ray": ray},
    }
    print(f"\nlocal backend vs Ray (3 nodes on 127.0.0.1, in a network namespace); "
          f"{os.cpu_count()} cores; medians of {args.runs} run(s), {args.starts} start(s); "
          f"{load()}\n")
    print(f"{'':46s}{'local':>12s}{'ray':>12s}  {'ray/local':>8s}")
    row("session start, first (environment built)", fig["first_start_s"]["local"],
        fig["first_start_s"]["ray"])
    row("session start (environment cached)", fig["start_s"]["local"], fig["start_s"]["ray"])
    row(f"echo {n:,} lines, b2 (2 workers)", fig["echo_s"]["local"], fig["echo_s"]["ray"])
    e_l, e_r = fig["echo_s"]["local"], fig["echo_s"]["ray"]
    row("  lines/s", n / e_l if e_l else None, n / e_r if e_r else None, "/s")
    row(f"sleep 100 ms x {m:,} lines, {w} workers, b8", fig["latency_b8_s"]["local"],
        fig["latency_b8_s"]["ray"])
    row(f"  same on b2: {w} workers spread over helpers", fig["latency_b8_s"]["local"],
        fig["latency_b2_spread_s"]["ray"])
    print(f"{'  floor: lines x 0.1 s / workers':46s}{floor:10.2f} s")
    lat = fig["latency_b8_s"]
    if lat["local"]:
        print(f"\nlatency-bound, local: {lat['local'] / floor:.2f}x the floor; "
              f"ray (one supervisor): {lat['ray'] / floor if lat['ray'] else float('nan'):.2f}x; "
              f"ray (spread): "
              f"{(fig['latency_b2_spread_s']['ray'] or float('nan')) / floor:.2f}x "
              "(spread: each run starts its helpers)")
    if "cluster_up_s" in ray:
        print(f"(the Ray cluster took {ray['cluster_up_s']:.1f} s to start, not counted)")
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--starts", type=int, default=3)
    parser.add_argument("--lines", type=int, default=10000)
    parser.add_argument("--latency-lines", type=int, default=1000)
    parser.add_argument("--latency-workers", type=int, default=8)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--half", choices=["ray"], help=argparse.SUPPRESS)
    parser.add_argument("--images", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("UV_PYTHON_DOWNLOADS", "never")
    if args.half == "ray":  # inside the namespace
        args.out.write_text(json.dumps(ray_half(args.images, args)))
        return
    images = Settings.from_env().images_dir
    with tempfile.TemporaryDirectory(prefix="fs-bench-rb-") as tmp:
        s = Settings(home=Path(tmp) / "home", images_path=images)
        image = asyncio.run(EnvironmentService(s, open_store(s.db_url)).images
                            .ensure_built(DEFAULT_IMAGE))
        print(f"image {image.ref} at {image.path}; {load()}", flush=True)
        print("local backend:", flush=True)
        local = local_half(images, args)
        print("ray backend (in a loopback-only network namespace):", flush=True)
        out = Path(tmp) / "ray.json"
        cmd = [sys.executable, str(REPO / "tests/helpers/netns.py"), sys.executable,
               str(Path(__file__).resolve()), "--half", "ray", "--images", str(images),
               "--out", str(out), "--runs", str(args.runs), "--starts", str(args.starts),
               "--lines", str(args.lines), "--latency-lines", str(args.latency_lines),
               "--latency-workers", str(args.latency_workers)]
        subprocess.run(cmd, check=True)
        ray = json.loads(out.read_text())
    fig = report(local, ray, args)
    if args.json:
        args.json.write_text(json.dumps(fig, indent=2) + "\n")
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()

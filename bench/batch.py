"""Benchmark: batch-run throughput, whole command against whole command: `flowsession run
create` through a real server against `pf run create`, and the executor's own floor.

For tests/flows/echo (one python node that returns its input), each figure is measured in the
same run:

  headline (whole commands)
  flowsession  `flowsession run create --flow F --data D --stream --json` against this home's
               local server (started by `flowsession server start`, not counted), on the flow's
               session ALREADY RUNNING (started by a 10-line warm-up run, not counted): the
               whole command, interpreter start-up and the progress stream included. Each run
               is checked: Completed, N completed, no failed line, outputs.jsonl has N rows,
               each echoing its input.
  pf           `pf run create --flow F --data D --name N` (promptflow-devkit in the default
               image, default workers, a temporary HOME): the whole command. A 10-line pf run
               first starts pf's local service (not counted), as the warm-up run starts
               flowsession's session. Each run is checked with `pf run show` and its
               output.jsonl.
  floor        one process, the image's python: `FlowExecutor.create` for the flow, then
               `exec_line` over N lines (10,000); ms per line. floor x cores = (1000 /
               floor_ms) x the cores the session has: its VM size's vCPUs when a cgroup holds
               it to them (read from `flowsession session show --json` and `compute sizes
               --json`), never more than the machine's cores.

  beside it (in-process, labelled as such)
  RunService   `RunService.create` -> Completed in this process, on an already running
               session (`wait` polls every 0.25 s), its own home; --skip-in-process leaves it.

Targets (on the whole commands): flowsession >= 30x pf at 10,000 lines; per-line cost at
100,000 within 15% of that at 10,000 (ratio <= 1.15); flowsession lines/s at the largest size
>= 0.60 x (floor x session cores).

    .venv/bin/python bench/batch.py [--sizes 1000,10000] [--with-100k] [--runs 3]
                                    [--pf-sizes 1000,10000] [--skip-peer-10k]
                                    [--skip-in-process] [--floor-lines 10000]
                                    [--floor-runs 3] [--json PATH]

The default image is built first if needed (PyPI). Figures are medians of --runs runs.
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
sys.path.insert(0, str(REPO / "bench"))

from _common import cli_env, copy_flow, fs_run, load, server_start, server_stop  # noqa: E402
from _common import session_cores  # noqa: E402

from flowsession.config import Settings  # noqa: E402
from flowsession.environments.images import DEFAULT_IMAGE  # noqa: E402
from flowsession.runs import records as R  # noqa: E402
from flowsession.runs.service import POLL_S, RunService  # noqa: E402
from flowsession.runs.spec import RunSpec  # noqa: E402
from flowsession.sessions.service import SessionService  # noqa: E402

USER = "bench"
FLOW = REPO / "tests/flows/echo"
WARMUP_LINES = 10

# the floor: one process, FlowExecutor.exec_line in a loop (50 warm-up lines not counted)
FLOOR_SRC = r"""
import json, sys, time
from pathlib import Path
from promptflow.executor import FlowExecutor
flow, n, out = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
ex = FlowExecutor.create(flow / "flow.dag.yaml", {}, working_dir=flow, raise_ex=False)
for i in range(50):
    ex.exec_line({"text": f"warm {i}"}, index=i, run_id="floor")
bad = 0
t0 = time.perf_counter()
for i in range(n):
    r = ex.exec_line({"text": f"line {i}"}, index=i, run_id="floor")
    bad += (r.output or {}).get("out") != f"line {i}"
t = time.perf_counter() - t0
Path(out).write_text(json.dumps({"lines": n, "seconds": t, "bad": bad}))
"""


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def write_data(path: Path, n: int) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"line {i}"}) + "\n")
    return path


# --- flowsession ----------------------------------------------------------------------------

def check_run(svc: RunService, run, n: int) -> None:
    problems = []
    if run.status != R.RunStatus.COMPLETED:
        problems.append(f"status {run.status} ({run.error})")
    if run.total != n or run.completed != n or run.failed:
        problems.append(f"total {run.total}, completed {run.completed}, failed {run.failed}")
    check_outputs(run.name, svc.files(run.name).root / "outputs.jsonl", n, problems)


def check_outputs(name: str, outputs: Path, n: int, problems: list[str]) -> None:
    rows = 0
    with open(outputs) as f:
        for raw in f:
            row = json.loads(raw)
            if row.get("out") != f"line {row.get('line_number')}":
                problems.append(f"row {rows} of outputs.jsonl is {row}")
                break
            rows += 1
    if rows != n:
        problems.append(f"outputs.jsonl has {rows} rows, not {n}")
    if problems:
        raise SystemExit(f"run {name} of {n} lines is wrong: " + "; ".join(problems))


async def flowsession_runs(svc: RunService, flow: Path, data: dict[int, Path], sizes: list[int],
                           runs: int) -> tuple[dict, float]:
    t0 = time.perf_counter()
    warm = await svc.create(RunSpec(flow=str(flow), data=str(data[WARMUP_LINES])), user=USER)
    warm = await svc.wait(warm.name, user=USER)
    check_run(svc, warm, WARMUP_LINES)
    warmup_s = time.perf_counter() - t0
    out: dict[int, dict[str, list[float]]] = {
        n: {"wall": [], "create": [], "duration": [], "workers": []} for n in sizes}
    for i in range(runs):  # sizes interleaved: a slow spell of the machine is shared out
        for n in sizes:
            t0 = time.perf_counter()
            run = await svc.create(RunSpec(flow=str(flow), data=str(data[n])), user=USER)
            t1 = time.perf_counter()
            run = await svc.wait(run.name, user=USER)
            wall = time.perf_counter() - t0
            check_run(svc, run, n)
            out[n]["wall"].append(wall)
            out[n]["create"].append(t1 - t0)
            out[n]["duration"].append(run.ended_at - run.started_at)
            print(f"  flowsession {n:>7,} lines  run {i + 1}/{runs}: {wall:8.2f} s  "
                  f"({n / wall:7.0f} lines/s; create {t1 - t0:.2f} s, run duration "
                  f"{run.ended_at - run.started_at:.2f} s)  {load()}", flush=True)
    return out, warmup_s


# --- flowsession run create, the whole command -----------------------------------------------

def cli_runs(env: dict, runs_dir: Path, tmp: Path, flow: Path, data: dict[int, Path],
             sizes: list[int], runs: int) -> tuple[dict, float, tuple[int, str]]:
    t0 = time.perf_counter()
    fs_run(env, tmp, flow, data[WARMUP_LINES], WARMUP_LINES)  # starts the session
    warmup_s = time.perf_counter() - t0
    cores = session_cores(env, tmp, flow)
    out: dict[int, dict[str, list[float]]] = {n: {"wall": [], "duration": []} for n in sizes}
    for i in range(runs):  # sizes interleaved: a slow spell of the machine is shared out
        for n in sizes:
            r = fs_run(env, tmp, flow, data[n], n, "--stream")
            problems = [f"{r['failed']} failed lines"] if r["failed"] else []
            check_outputs(r["name"], runs_dir / r["name"] / "outputs.jsonl", n, problems)
            out[n]["wall"].append(r["wall"])
            out[n]["duration"].append(r["duration"])
            print(f"  flowsession run create {n:>7,} lines  run {i + 1}/{runs}: "
                  f"{r['wall']:8.2f} s  ({n / r['wall']:7.0f} lines/s; run duration "
                  f"{r['duration']:.2f} s)  {load()}", flush=True)
    return out, warmup_s, cores


# --- pf run create --------------------------------------------------------------------------

def pf_run(python: Path, flow: Path, data: Path, name: str, env: dict, cwd: Path) -> dict:
    pf = [str(python), "-m", "promptflow._cli._pf.entry"]
    log = cwd / f"{name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run([*pf, "run", "create", "--flow", str(flow), "--data", str(data),
                             "--name", name], env=env, cwd=cwd, stdout=f,
                            stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    show = subprocess.run([*pf, "run", "show", "--name", name], env=env, cwd=cwd,
                          capture_output=True, text=True)
    try:
        info = json.loads(show.stdout[show.stdout.index("{"):])
    except ValueError:
        raise SystemExit(f"pf run {name}: exit {rc}; `pf run show` said:\n{show.stdout}"
                         f"{show.stderr}\n(log {log})") from None
    n = sum(1 for _ in open(data))
    output = Path(info["properties"]["output_path"]) / "flow_outputs" / "output.jsonl"
    rows = sum(1 for _ in open(output)) if output.exists() else 0
    if rc != 0 or info.get("status") != "Completed" or rows != n:
        raise SystemExit(f"pf run {name}: exit {rc}, status {info.get('status')}, "
                         f"{rows} output rows of {n} (log {log})")
    return {"wall": wall, "duration": info["properties"]["system_metrics"].get("duration")}


# --- the floor ------------------------------------------------------------------------------

def floor_ms(python: Path, flow: Path, lines: int, out: Path) -> float:
    subprocess.run([str(python), "-c", FLOOR_SRC, str(flow), str(lines), str(out)],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    r = json.loads(out.read_text())
    if r["bad"]:
        raise SystemExit(f"the floor loop had {r['bad']} wrong outputs")
    return r["seconds"] * 1000 / r["lines"]


# --- main -----------------------------------------------------------------------------------

def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,10000", help="flowsession run sizes")
    parser.add_argument("--with-100k", action="store_true", help="and 100,000 lines")
    parser.add_argument("--runs", type=int, default=3, help="runs of each flowsession size")
    parser.add_argument("--pf-sizes", default="1000,10000", help="pf run create sizes")
    parser.add_argument("--skip-peer-10k", action="store_true",
                        help="no pf run of 10,000 lines (it takes minutes)")
    parser.add_argument("--skip-in-process", action="store_true",
                        help="no in-process RunService figures")
    parser.add_argument("--floor-lines", type=int, default=10000)
    parser.add_argument("--floor-runs", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s] + ([100000] if args.with_100k else [])
    pf_sizes = [int(s) for s in args.pf_sizes.split(",") if s]
    if args.skip_peer_10k:
        pf_sizes = [n for n in pf_sizes if n != 10000]
    os.environ.setdefault("UV_PYTHON_DOWNLOADS", "never")

    base = Settings.from_env()
    tmp = Path(tempfile.mkdtemp(prefix="fs-bench-batch-"))
    settings = replace(base, home=tmp / "home", images_path=base.images_dir, database_url=None,
                       standby_pool_size=0, runtime_path=None)
    cli_settings = replace(base, home=tmp / "cli-home", images_path=base.images_dir,
                           database_url=None, runtime_path=None)
    env = cli_env(cli_settings.home, base.images_dir)
    flow = copy_flow(FLOW, tmp / "echo")
    cli_flow = copy_flow(FLOW, tmp / "echo-cli")
    data = {n: write_data(tmp / f"data-{n}.jsonl", n)
            for n in sorted({WARMUP_LINES, *sizes, *pf_sizes})}
    pf_home = tmp / "pf-home"
    pf_home.mkdir()
    pf_env = {**os.environ, "HOME": str(pf_home)}
    cli: dict = {}
    inproc: dict = {}
    pf: dict[int, dict] = {}
    floors: list[float] = []
    python = None
    try:
        sessions = SessionService.open(settings)
        svc = RunService.open(settings, sessions=sessions)
        image = asyncio.run(sessions.envs.images.ensure_built(DEFAULT_IMAGE))
        python = Path(image.path) / "bin" / "python"
        print(f"echo flow; image {DEFAULT_IMAGE} at {image.path}; {load()}", flush=True)

        server_start(env)
        try:
            cli, warmup_s, (cores, cores_how) = cli_runs(env, cli_settings.runs_dir, tmp,
                                                         cli_flow, data, sizes, args.runs)
        finally:
            server_stop(env, tmp, [cli_flow])
        print(f"  (warm-up: session start + {WARMUP_LINES}-line run {warmup_s:.2f} s, not "
              f"counted); the session's cores: {cores} ({cores_how})", flush=True)

        if not args.skip_in_process:
            async def fs_part():
                try:
                    return await flowsession_runs(svc, flow, data, sizes, args.runs)
                finally:
                    await sessions.stop(flow, user=USER)

            inproc, _ = asyncio.run(fs_part())
        sessions.store.engine.dispose()

        for i in range(args.floor_runs):
            floors.append(floor_ms(python, flow, args.floor_lines, tmp / f"floor-{i}.json"))
            print(f"  floor {args.floor_lines:,} exec_line calls, run {i + 1}/{args.floor_runs}: "
                  f"{floors[-1]:.3f} ms/line  {load()}", flush=True)

        if pf_sizes:
            t = pf_run(python, flow, data[WARMUP_LINES], "warmup", pf_env, tmp)
            print(f"  (pf warm-up: {WARMUP_LINES}-line run starting pf's service "
                  f"{t['wall']:.2f} s, not counted)", flush=True)
        for n in pf_sizes:
            pf[n] = pf_run(python, flow, data[n], f"pf_{n}", pf_env, tmp)
            print(f"  pf run create {n:>7,} lines: {pf[n]['wall']:8.2f} s  "
                  f"({n / pf[n]['wall']:5.0f} lines/s; pf's own duration "
                  f"{pf[n]['duration']:.2f} s)  {load()}", flush=True)
    finally:
        if python is not None and pf_sizes:
            subprocess.run([str(python), "-m", "promptflow._cli._pf.entry", "service", "stop"],
                           env=pf_env, cwd=tmp, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    report(args, sizes, pf_sizes, cli, inproc, pf, floors, cores, cores_how)


def report(args, sizes, pf_sizes, cli, inproc, pf, floors, cores, cores_how) -> None:
    floor = med(floors)
    floor_lps = 1000 / floor
    floor_cores = floor_lps * cores
    fig: dict = {"session_cores": cores, "session_cores_from": cores_how, "runs": args.runs,
                 "poll_s": POLL_S,
                 "floor": {"lines": args.floor_lines, "runs": floors, "ms_per_line": floor,
                           "lines_per_s": floor_lps, "x_cores_lines_per_s": floor_cores},
                 "cli": {}, "in_process": {}, "pf": {}}
    for key, part in (("cli", cli), ("in_process", inproc)):
        for n, r in part.items():
            wall, dur = med(r["wall"]), med(r["duration"])
            fig[key][n] = {"lines": n, "wall_s": r["wall"], "median_wall_s": wall,
                           "lines_per_s": n / wall, "ms_per_line": wall * 1000 / n,
                           "duration_s": r["duration"], "median_duration_s": dur,
                           "vs_floor_x_cores": n / wall / floor_cores}
    for n, r in pf.items():
        fig["pf"][n] = {"lines": n, "wall_s": r["wall"], "lines_per_s": n / r["wall"],
                        "ms_per_line": r["wall"] * 1000 / n, "pf_duration_s": r["duration"]}
    c, p = fig["cli"], fig["pf"]
    top = max(sizes)
    speedup = p[10000]["wall_s"] / c[10000]["median_wall_s"] if 10000 in c and 10000 in p \
        else None
    scaling = c[100000]["ms_per_line"] / c[10000]["ms_per_line"] if 100000 in c and 10000 in c \
        else None
    eff = c[top]["vs_floor_x_cores"]
    fig["ratios"] = {"cli_vs_pf_10k": speedup, "cli_per_line_100k_vs_10k": scaling,
                     f"cli_{top}_vs_floor_x_cores": eff}

    print(f"\nbatch runs of tests/flows/echo, whole commands; flowsession: median of "
          f"{args.runs}, pf: 1 run each; floor x cores uses the session's {cores} cores "
          f"({cores_how}); {load()}\n")
    print(f"{'whole command':34s}{'lines':>9s}{'seconds':>10s}{'lines/s':>10s}{'ms/line':>10s}"
          f"{'run dur. s':>12s}{'x pf':>8s}{'x floor*cores':>15s}")
    for n in sizes:
        r = c[n]
        xpf = f"{p[n]['wall_s'] / r['median_wall_s']:.1f}" if n in p else "-"
        print(f"{'flowsession run create --stream':34s}{n:>9,}{r['median_wall_s']:>10.2f}"
              f"{r['lines_per_s']:>10.0f}{r['ms_per_line']:>10.3f}"
              f"{r['median_duration_s']:>12.2f}{xpf:>8s}{r['vs_floor_x_cores']:>15.2f}")
    for n in pf_sizes:
        r = p[n]
        print(f"{'pf run create':34s}{n:>9,}{r['wall_s']:>10.2f}{r['lines_per_s']:>10.0f}"
              f"{r['ms_per_line']:>10.3f}{r['pf_duration_s']:>12.2f}{1:>8.1f}"
              f"{r['lines_per_s'] / floor_cores:>15.2f}")
    print(f"{'floor: exec_line loop, 1 process':34s}{args.floor_lines:>9,}"
          f"{floor * args.floor_lines / 1000:>10.2f}{floor_lps:>10.0f}{floor:>10.3f}"
          f"{'':>12s}{'':>8s}{1 / cores:>15.2f}")
    print(f"{f'floor x {cores} session cores':34s}{'':>9s}{'':>10s}{floor_cores:>10.0f}"
          f"{floor / cores:>10.3f}{'':>12s}{'':>8s}{1:>15.2f}")
    if inproc:
        print(f"\nbeside it, in-process (RunService.create -> Completed in this process, "
              f"polled every {POLL_S} s; no CLI, no HTTP)")
        for n in sizes:
            r = fig["in_process"][n]
            print(f"{'RunService run (in-process)':34s}{n:>9,}{r['median_wall_s']:>10.2f}"
                  f"{r['lines_per_s']:>10.0f}{r['ms_per_line']:>10.3f}"
                  f"{r['median_duration_s']:>12.2f}{'':>8s}{r['vs_floor_x_cores']:>15.2f}")
    print(f"\n(floor: median of {len(floors)}: " + ", ".join(f"{x:.3f}" for x in floors)
          + " ms/line)\n")
    if speedup is not None:
        print(f"flowsession / pf at 10,000 lines, whole commands   {speedup:7.1f}x   "
              f"(target >= 30x)   {verdict(speedup >= 30)}")
    else:
        print("flowsession / pf at 10,000 lines, whole commands   n/a (needs both at 10,000)")
    if scaling is not None:
        print(f"per-line cost 100,000 / 10,000, whole command      {scaling:7.3f}    "
              f"(target <= 1.15)  {verdict(scaling <= 1.15)}")
    print(f"flowsession {top:,} lines / (floor x {cores} cores)     {eff:7.2f}    "
          f"(target >= 0.60)  {verdict(eff >= 0.60)}")
    if args.json:
        args.json.write_text(json.dumps(fig, indent=2) + "\n")
        print(f"\nfigures written to {args.json}")


if __name__ == "__main__":
    main()

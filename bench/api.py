"""Benchmark: the REST API under concurrent clients, against a real `flowsession server`.

A server is started as a subprocess (isolated home, standby pool 0, a free port of 127.0.0.1),
the administrator's token read from its client.json; tests/flows/echo is registered (uploaded)
with the SDK and its session started. Then, with C concurrent clients (one httpx.AsyncClient,
C connections, in this process):

  health     GET /api/health (no token, no database): the floor of a request
  session    GET /api/flows/echo/session (N requests): token check, flow lookup, the session's
             reconciliation (a status call to its supervisor)
  submit     POST /api/runs with L inline data lines (R submissions; each answers 202 and the
             runs queue behind each other on the one session): submission latency
  complete   from the last submission's answer until every run is Completed (polled with
             GET /api/runs every 0.5 s); each run is then checked (status, line counts, every
             output echoing its input)

Latencies are p50 / p99 / max per request; req/s = requests / wall time of the phase. The
client and the server share this machine's cores.

    .venv/bin/python bench/api.py [--clients 50] [--gets 2000] [--runs 200] [--lines 3]
                                  [--json PATH]

The default image is built first if needed (PyPI).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from flowsession.client import Client  # noqa: E402
from flowsession.config import Settings  # noqa: E402
from flowsession.environments.images import DEFAULT_IMAGE  # noqa: E402
from flowsession.environments.service import EnvironmentService  # noqa: E402
from flowsession.store import open_store  # noqa: E402

FLOW = REPO / "tests/flows/echo"
EXE = REPO / ".venv/bin/flowsession"
ENDED = ("Completed", "Failed", "Canceled")


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """The server process's resident memory."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * len(xs)) - 1))]


def summary(latencies: list[float], wall: float, errors: int) -> dict:
    return {"requests": len(latencies), "errors": errors, "wall_s": wall,
            "rps": len(latencies) / wall if wall else float("nan"),
            "p50_ms": pct(latencies, 50) * 1000, "p99_ms": pct(latencies, 99) * 1000,
            "max_ms": max(latencies) * 1000, "mean_ms": statistics.fmean(latencies) * 1000}


async def hammer(client: httpx.AsyncClient, n: int, clients: int, make_request,
                 expect: int) -> tuple[dict, list[httpx.Response]]:
    """n requests from `clients` concurrent workers; latency of each, answers kept."""
    latencies: list[float] = []
    answers: list[httpx.Response] = []
    errors: list[str] = []
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            t0 = time.perf_counter()
            try:
                r = await make_request(client, i)
            except httpx.HTTPError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            latencies.append(time.perf_counter() - t0)
            if r.status_code != expect:
                errors.append(f"{r.status_code} {r.text[:200]}")
            answers.append(r)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - t0
    if errors:
        print(f"  {len(errors)} error(s); first: {errors[0]}")
    return summary(latencies, wall, len(errors)), answers


async def wait_runs(client: httpx.AsyncClient, names: set[str], timeout: float) -> dict:
    """Poll GET /api/runs until every named run has ended."""
    t0 = time.perf_counter()
    status: dict[str, str] = {}
    while time.perf_counter() - t0 < timeout:
        r = await client.get("/api/runs", params={"max_results": 10000})
        r.raise_for_status()
        status = {run["name"]: run["status"] for run in r.json() if run["name"] in names}
        if len(status) == len(names) and all(s in ENDED for s in status.values()):
            break
        await asyncio.sleep(0.5)
    return status


async def check_runs(client: httpx.AsyncClient, names: list[str], lines: int,
                     inputs: dict[str, list[str]]) -> list[str]:
    problems: list[str] = []
    sem = asyncio.Semaphore(10)

    async def one(name: str) -> None:
        async with sem:
            run = (await client.get(f"/api/runs/{name}")).json()
            outputs = (await client.get(f"/api/runs/{name}/outputs")).json()
        if run["status"] != "Completed" or run["completed"] != lines or run["failed"]:
            problems.append(f"{name}: {run['status']} {run['summary']} {run.get('error')}")
        elif [o["out"] for o in outputs] != inputs[name]:
            problems.append(f"{name}: outputs {outputs} are not {inputs[name]}")

    await asyncio.gather(*(one(n) for n in names))
    return problems


async def measure(url: str, token: str, args, server_pid: int) -> dict:
    fig: dict = {}
    headers = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(600, connect=30)) as client:
        for _ in range(50):  # warm-up: connections, the server's caches
            (await client.get("/api/flows/echo/session")).raise_for_status()
        fig["rss_before_mb"] = rss_mb(server_pid)

        print(f"GET /api/health x {args.gets} ...", flush=True)
        fig["health"], _ = await hammer(client, args.gets, args.clients,
                                        lambda c, i: c.get("/api/health"), 200)
        print(f"GET /api/flows/echo/session x {args.gets} ...", flush=True)
        fig["session"], _ = await hammer(client, args.gets, args.clients,
                                         lambda c, i: c.get("/api/flows/echo/session"), 200)

        inputs: dict[int, list[str]] = {i: [f"run {i} line {j}" for j in range(args.lines)]
                                        for i in range(args.runs)}

        def submit(c: httpx.AsyncClient, i: int):
            return c.post("/api/runs", json={
                "flow": "echo", "name": f"bench-{i:05d}",
                "data_lines": [{"text": t} for t in inputs[i]]})

        print(f"POST /api/runs x {args.runs} ({args.lines} lines each) ...", flush=True)
        t_submit = time.perf_counter()
        fig["submit"], answers = await hammer(client, args.runs, args.clients, submit, 202)
        t_submitted = time.perf_counter()
        names = [r.json()["run"]["name"] for r in answers if r.status_code == 202]
        fig["submit"]["statuses_at_submission"] = {
            s: sum(1 for r in answers if r.status_code == 202
                   and r.json()["run"]["status"] == s)
            for s in {r.json()["run"]["status"] for r in answers if r.status_code == 202}}

        print(f"waiting for {len(names)} runs to complete ...", flush=True)
        status = await wait_runs(client, set(names), args.timeout)
        t_done = time.perf_counter()
        by_name = {f"bench-{i:05d}": inputs[i] for i in inputs}
        problems = await check_runs(client, names, args.lines, by_name)
        counts = {s: sum(1 for v in status.values() if v == s) for s in set(status.values())}
        runs = (await client.get("/api/runs", params={"max_results": 10000})).json()
        runs = [r for r in runs if r["name"] in set(names)]
        durations = [r["duration"] for r in runs if r.get("duration") is not None]
        first_start = min((r["started_at"] for r in runs if r.get("started_at")), default=None)
        last_end = max((r["ended_at"] for r in runs if r.get("ended_at")), default=None)
        fig["complete"] = {
            "runs": len(names), "statuses": counts, "problems": len(problems),
            "after_last_submission_s": t_done - t_submitted,
            "from_first_submission_s": t_done - t_submit,
            "runs_per_s": len(names) / (t_done - t_submit),
            "server_span_s": (last_end - first_start) if first_start and last_end else None,
            "run_duration_p50_s": pct(durations, 50) if durations else None,
            "run_duration_max_s": max(durations) if durations else None}
        if problems:
            print(f"  {len(problems)} run(s) wrong; first: {problems[0]}")
        fig["rss_after_mb"] = rss_mb(server_pid)
    fig["load_after"] = load()
    return fig


def start_server(home: Path, images: Path, log: Path) -> tuple[subprocess.Popen, str, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k not in ("FLOWSESSION_URL",
                                                           "FLOWSESSION_TOKEN")}
    env.update(FLOWSESSION_HOME=str(home), FLOWSESSION_IMAGES_DIR=str(images),
               FLOWSESSION_STANDBY_POOL="0")
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(EXE), "server", "--port", str(port), "--log-level",
                                 "warning"], env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    config = home / "client.json"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/api/health", timeout=2).status_code == 200 and config.exists():
                return proc, url, json.loads(config.read_text())["token"]
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"the server did not come up:\n{log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def row(label: str, f: dict) -> str:
    return (f"{label:38s}{f['requests']:>7d}{f['errors']:>7d}{f['p50_ms']:>10.1f}"
            f"{f['p99_ms']:>10.1f}{f['max_ms']:>10.1f}{f['rps']:>10.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--gets", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--lines", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=900,
                        help="seconds to wait for the runs to complete")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args()
    os.environ.setdefault("UV_PYTHON_DOWNLOADS", "never")
    base = Settings.from_env()
    tmp = Path(tempfile.mkdtemp(prefix="fs-bench-api-"))
    home = tmp / "home"
    home.mkdir()
    log = tmp / "server.log"
    settings = replace(base, home=home, images_path=base.images_dir, database_url=None)
    asyncio.run(EnvironmentService(settings, open_store(settings.db_url))
                .images.ensure_built(DEFAULT_IMAGE))
    proc = None
    fig: dict = {"load_before": load()}
    try:
        proc, url, token = start_server(home, base.images_dir, log)
        with Client(url=url, token=token) as client:
            client.register_flow("echo", FLOW)
            t0 = time.perf_counter()
            session = client.start_session("echo")
            fig["session_start_s"] = time.perf_counter() - t0
            try:
                fig["session_vcpu"] = next((c["vcpu"] for c in client.list_computes()
                                            if c["id"] == session.compute_id), None)
                fig.update(asyncio.run(measure(url, token, args, proc.pid)))
            finally:
                client.stop_session("echo")
    except BaseException:
        if log.exists():
            print(log.read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        if proc is not None:
            stop_server(proc)
        server_log = log.read_text() if log.exists() else ""
        shutil.rmtree(tmp, ignore_errors=True)
    fig["server_log_errors"] = sum(1 for line in server_log.splitlines()
                                   if " ERROR " in line or "Traceback" in line)

    print(f"\nflowsession API, {os.cpu_count()} cores (client and server on the same machine), "
          f"{args.clients} concurrent clients; tests/flows/echo, one session "
          f"({fig['session_vcpu']} vCPU; started through the API in "
          f"{fig['session_start_s']:.2f} s); {fig['load_before']} before, "
          f"{fig['load_after']} after\n")
    print(f"{'':38s}{'reqs':>7s}{'errors':>7s}{'p50 ms':>10s}{'p99 ms':>10s}{'max ms':>10s}"
          f"{'req/s':>10s}")
    print(row("GET /api/health (floor)", fig["health"]))
    print(row("GET /api/flows/echo/session", fig["session"]))
    print(row(f"POST /api/runs ({args.lines} inline lines) -> 202", fig["submit"]))
    c = fig["complete"]
    print(f"\nat submission: {fig['submit']['statuses_at_submission']}")
    print(f"all {c['runs']} runs ended {c['after_last_submission_s']:.1f} s after the last "
          f"submission ({c['from_first_submission_s']:.1f} s after the first: "
          f"{c['runs_per_s']:.2f} runs/s, {c['runs_per_s'] * args.lines:.1f} lines/s); "
          f"statuses {c['statuses']}; {c['problems']} wrong")
    if c["server_span_s"] is not None:
        print(f"server side: first start to last end {c['server_span_s']:.1f} s; a run's "
              f"duration p50 {c['run_duration_p50_s']:.1f} s, max {c['run_duration_max_s']:.1f} s")
    print(f"server memory (RSS): {fig['rss_before_mb']:.0f} MB before, "
          f"{fig['rss_after_mb']:.0f} MB after; errors in its log: {fig['server_log_errors']}")
    if args.json:
        args.json.write_text(json.dumps(fig, indent=2) + "\n")
        print(f"\nfigures written to {args.json}")


if __name__ == "__main__":
    main()

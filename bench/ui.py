"""Benchmark: the web UI's pages against the API calls each one stands on.

A real `flowsession server` (subprocess, isolated home) holds 100 flows (uploaded through the
API) and 1,000 ended runs (written straight into its database: a benchmark of rendering, not of
running). For each page, the median of N sequential GETs of the page (signed in, cookie) is set
beside the median of the same API calls made one after another by a client with the token
(what the page costs without its HTML). The issue's bar: each page within 2x.

    .venv/bin/python bench/ui.py [--repeat 30] [--flows 100] [--runs 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO / "tests")]

from helpers.server import Server  # noqa: E402
from sqlalchemy import insert  # noqa: E402

from flowsession.config import Settings  # noqa: E402
from flowsession.store import open_store  # noqa: E402
from flowsession.store.tables import runs  # noqa: E402

DAG = (REPO / "tests/flows/conditional/flow.dag.yaml").read_text()
FILES = {p.name: p.read_text() for p in (REPO / "tests/flows/conditional").iterdir()
         if p.is_file()}


def seed(srv: Server, api: httpx.Client, n_flows: int, n_runs: int) -> tuple[str, str]:
    for i in range(n_flows):
        api.post("/api/flows", json={"name": f"flow-{i:03d}", "files": FILES}).raise_for_status()
    flow = api.get("/api/flows/flow-007").json()
    store = open_store(Settings(home=srv.home).db_url)
    now = time.time()
    rows = [dict(name=f"run-{i:04d}", owner="ada", flow=flow["path"], display_name=f"run-{i:04d}",
                 description="", tags="{}", status="Completed",
                 spec=json.dumps({"flow": flow["path"], "data": "data.jsonl"}), total=4,
                 completed=4, failed=0, errors="[]", created_at=now - i, started_at=now - i,
                 ended_at=now - i + 1) for i in range(n_runs)]
    with store.engine.begin() as conn:
        conn.execute(insert(runs), rows)
    return "flow-007", "run-0500"


def median_ms(fn, repeat: int) -> float:
    fn()  # warm
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--flows", type=int, default=100)
    ap.add_argument("--runs", type=int, default=1000)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-ui-"))
    (root / "images").mkdir()
    srv = Server(root / "home", root / "images", None)
    try:
        api = httpx.Client(base_url=srv.url, timeout=60,
                           headers={"Authorization": f"Bearer {srv.token}"})
        flow, run = seed(srv, api, args.flows, args.runs)
        ui = httpx.Client(base_url=srv.url, timeout=60)
        nonce = re.search(r'name="nonce" value="([^"]+)"', ui.get("/signin").text).group(1)
        assert ui.post("/signin", data={"token": srv.token, "nonce": nonce}).status_code == 303
        assert ui.cookies.get("fs_session")
        pages = {
            "/flows": ["/me", "/flows"],
            f"/flows/{flow}": ["/me", f"/flows/{flow}", f"/flows/{flow}/files/flow.dag.yaml",
                               "/sessions", "/runs?max_results=200"],
            "/runs": ["/me", "/runs?max_results=26&offset=0"],
            "/runs?page_no=30": ["/me", "/runs?max_results=26&offset=725"],
            f"/runs/{run}": ["/me", f"/runs/{run}"],
            "/computes": ["/me", "/computes", "/computes/sizes", "/sessions"],
            "/admin": ["/me", "/users", "/tokens", "/roles", "/identities", "/connections",
                       "/audit"],
        }
        print(f"flowsession web UI: {args.flows} flows, {args.runs} runs in the store; "
              f"median of {args.repeat} sequential requests; load average "
              + " ".join(f"{x:.2f}" for x in os.getloadavg()))
        print(f"{'page':<22} {'page ms':>9} {'API calls ms':>13} {'calls':>6} {'ratio':>6}")
        worst = 0.0
        for path, calls in pages.items():
            def get_page(path=path):
                r = ui.get(path)
                assert r.status_code == 200 and "<html" in r.text, (path, r.status_code)

            def get_calls(calls=calls):
                for c in calls:
                    r = api.get("/api" + c)
                    assert r.status_code in (200, 404), (c, r.status_code)

            p, a = median_ms(get_page, args.repeat), median_ms(get_calls, args.repeat)
            worst = max(worst, p / a)
            print(f"{path:<22} {p:>9.1f} {a:>13.1f} {len(calls):>6} {p / a:>5.2f}x")
        print(f"worst page / API ratio: {worst:.2f}x (the bar: 2x)")
        return 0
    finally:
        srv.stop()


if __name__ == "__main__":
    raise SystemExit(main())

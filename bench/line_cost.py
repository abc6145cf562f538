"""Benchmark (in-process, beside bench/llm_batch.py's whole commands): promptflow's CPU per line
of an LLM flow, with and without each change of src/flowsession/worker/pfcost.py.

One process of the default image runs tests/flows/llm_chat (an ``llm`` node) with
``FlowExecutor.exec_line`` on ``--threads`` threads against tests/helpers/openai_endpoint.py (100 ms
latency, usage tokens), tracing on (as a batch worker has it for token counts), the log to a
file (as a worker's). Each variant runs in a new process, ``--reps`` times, interleaved; the
figure is the median CPU time per line (process_time / lines). Every line's output and the
token count are checked.

    .venv/bin/python bench/line_cost.py [--lines 1000] [--threads 64] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

import _common  # noqa: E402
from _common import load  # noqa: E402


VARIANTS = {  # name -> what the child applies
    "promptflow as is": [],
    "+ span enrichment": ["lighten_tracing"],
    "+ jinja templates": ["compile_templates_once"],
    "+ signatures": ["look_up_signatures_once"],
    "+ node threads": ["reuse_node_threads"],
    "+ token counts": ["count_tokens_quietly"],
    "+ progress lines filtered": ["quiet"],
    "all (a batch worker)": ["lighten_batch_lines", "quiet"],
}

CHILD = r"""
import json, os, queue, sys, threading, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
flow, base_url, n, threads, log, changes = (Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]),
                                           int(sys.argv[5]), sys.argv[6], sys.argv[7:])
os.environ["PF_DISABLE_TRACING"] = "false"
from promptflow.executor import FlowExecutor
from flowsession.worker import pfcost
out = os.dup(1)
fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
os.dup2(fd, 1); os.dup2(fd, 2)
for change in changes:
    pfcost.quiet_node_logs({}) if change == "quiet" else getattr(pfcost, change)()
conns = {"open_ai_connection": {"type": "OpenAIConnection",
                                "value": {"api_key": "sk-test-key", "base_url": base_url}}}
ex = FlowExecutor.create(flow / "flow.dag.yaml", conns, working_dir=flow, raise_ex=False)
ex.exec_line({"question": "warm"}, index=0, run_id="warm")
todo, bad, tokens = queue.SimpleQueue(), [], []
for i in range(n):
    todo.put(i)
def runner():
    while True:
        try:
            i = todo.get_nowait()
        except queue.Empty:
            return
        r = ex.exec_line({"question": f"q {i}"}, index=i, run_id="bench")
        if (r.output or {}).get("answer") != f"echo: q {i}":
            bad.append(i)
        tokens.append((r.run_info.system_metrics or {}).get("total_tokens"))
c0, t0 = time.process_time(), time.perf_counter()
ts = [threading.Thread(target=runner) for _ in range(threads)]
for t in ts: t.start()
for t in ts: t.join()
os.write(out, json.dumps({"cpu": time.process_time() - c0, "wall": time.perf_counter() - t0,
                          "bad": len(bad), "no_tokens": sum(1 for t in tokens if not t)}).encode())
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--variants", help="comma-separated names (default: all)")
    args = parser.parse_args()
    os.environ.setdefault("UV_PYTHON_DOWNLOADS", "never")
    tmp = Path(tempfile.mkdtemp(prefix="fs-bench-cost-"))
    python = _common.default_image_python(tmp / "home")
    flow = _common.copy_flow(REPO / "tests/flows/llm_chat", tmp / "llm_chat")
    names = args.variants.split(",") if args.variants else list(VARIANTS)
    server = subprocess.Popen([sys.executable, str(REPO / "tests/helpers/openai_endpoint.py"),
                               "--latency", "0.1"], stdout=subprocess.PIPE, text=True,
                              stderr=subprocess.DEVNULL)
    cpu: dict[str, list[float]] = {n: [] for n in names}
    try:
        base_url = f"http://127.0.0.1:{int(server.stdout.readline())}/v1"
        print(f"{args.lines} lines x {args.threads} threads, {args.reps} reps; {load()}")
        for rep in range(args.reps):
            for name in names:
                p = subprocess.run([str(python), "-c", CHILD, str(REPO / "src"), str(flow),
                                    base_url, str(args.lines), str(args.threads),
                                    str(tmp / "worker.log"), *VARIANTS[name]],
                                   capture_output=True, text=True, cwd=tmp)
                if p.returncode:
                    raise SystemExit(f"{name}: exit {p.returncode}\n{p.stderr[-2000:]}")
                r = json.loads(p.stdout)
                if r["bad"] or r["no_tokens"]:
                    raise SystemExit(f"{name}: {r['bad']} wrong outputs, {r['no_tokens']} "
                                     "lines without a token count")
                cpu[name].append(1000 * r["cpu"] / args.lines)
            print(f"  rep {rep + 1}: {load()}", flush=True)
    finally:
        server.kill()
        server.wait()
    first = statistics.median(cpu[names[0]])
    print(f"\n| variant | CPU ms/line (median of {args.reps}) | runs | vs first |")
    print("|---|---|---|---|")
    for name in names:
        med = statistics.median(cpu[name])
        runs = " ".join(f"{x:.2f}" for x in sorted(cpu[name]))
        print(f"| {name} | {med:.2f} | {runs} | {med / first:.2f}x |")


if __name__ == "__main__":
    main()

"""Benchmark: LLM-bound batch runs (issue 11), whole CLI commands through a real server, side
by side in one run with `pf run create` at its defaults and with PF_WORKER_COUNT=16.

  flowsession  `flowsession run create --flow F --data D --json` (this home's local server,
               started by a first command and warmed up by a 10-line run of each flow: the
               session start is not counted), the whole command, at the default concurrency
               (64 lines in flight) unless said.
  pf           `pf run create --flow F --data D --name N` (promptflow-devkit in the default
               image, a temporary HOME; a 10-line warm-up run first, not counted), at pf's
               defaults and with PF_WORKER_COUNT=16 in its environment.

Cases:
  (a) sleep   tests/flows/sleepy: a python node that sleeps 100 ms, 1,000 lines
  (b) llm     tests/flows/llm_chat: an llm node against tests/helpers/openai_endpoint.py (an
              OpenAI-compatible server on 127.0.0.1, 100 ms latency, usage tokens), 1,000 lines
  (b2) llm    the same, the flow's session given the machine's cores (`--instance-type
              medium`, 2 vCPU) as pf has them: an implicit session takes the smallest size
              (`small`, 1 vCPU, issue 10), and (b) is bound by promptflow's CPU per line
  (c) 429     the same server limited to R answers/s (429 + retry-after beyond), --rate-lines
              lines: achieved rate = answered / (last answer - first answer) vs R; 0 failed
  (d) echo    tests/flows/echo at 10,000 (and --echo-sizes) lines; beside it the executor's
              floor (one process, exec_line in a loop), floor x cores

Each run is checked (Completed, every line completed, token counts for llm). Lines in flight:
"run" is the lines' summed duration over the run's (Little's law, from `run show-details`),
"endpoint" the answered requests x latency over the time between the first and last answer,
"peak" the most the endpoint saw at once. Targets: (a), (b) >= 10x pf defaults and >= 3x pf
PF_WORKER_COUNT=16, achieved concurrency (the endpoint's average for llm) >= 80% of the
setting; (c) >= 90% of R, 0 failed; (d) >= 30x pf, run lines/s >= 60% of floor x cores.

    .venv/bin/python bench/llm_batch.py [--lines 1000] [--rate 50] [--rate-lines 500] [--cases sleep,llm,429,echo]
                                        [--echo-sizes 10000,100000] [--skip-pf-echo]
                                        [--json PATH]

The default image is built first if needed (PyPI); FLOWSESSION_IMAGES_DIR reuses a built one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

import _common  # noqa: E402
from _common import EXE, fs, fs_run, load  # noqa: E402
from batch import floor_ms, pf_run, write_data  # noqa: E402

from flowsession.config import Settings  # noqa: E402
from flowsession.runs.model import DEFAULT_CONCURRENCY  # noqa: E402

SERVER = REPO / "tests/helpers/openai_endpoint.py"
FLOWS = REPO / "tests/flows"
WARMUP = 10
MEDIUM = ("--instance-type", "medium")  # (b2): the machine's 2 cores, as pf has them
LATENCY = 0.1


def copy_flow(name: str, tmp: Path) -> Path:
    return _common.copy_flow(FLOWS / name, tmp / name)


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class LLM:
    """tests/helpers/openai_endpoint.py as a process."""

    def __init__(self, latency: float, rate: float | None = None):
        cmd = [sys.executable, str(SERVER), "--latency", str(latency)]
        if rate:
            cmd += ["--rate", str(rate)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True)
        self.port = int(self.proc.stdout.readline())
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def stats(self) -> dict:
        import httpx

        return httpx.get(f"http://127.0.0.1:{self.port}/stats", timeout=10).json()

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=1000, help="lines of (a) and (b)")
    parser.add_argument("--rate", type=float, default=50, help="R of (c): answers/s")
    parser.add_argument("--rate-lines", type=int, default=500)
    parser.add_argument("--echo-sizes", default="10000")
    parser.add_argument("--skip-pf-echo", action="store_true")
    parser.add_argument("--cases", default="sleep,llm,llm2,429,echo",
                        help="which cases to run (the table shows those)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("UV_PYTHON_DOWNLOADS", "never")
    cores = os.cpu_count() or 1
    n = args.lines
    echo_sizes = [int(s) for s in args.echo_sizes.split(",") if s]

    base = Settings.from_env()
    tmp = Path(tempfile.mkdtemp(prefix="fs-bench-llm-"))
    home = tmp / "home"
    python = _common.default_image_python(home)
    env = _common.cli_env(home, base.images_dir, FLOWSESSION_STANDBY_POOL="0")
    pf_env = _common.pf_env(tmp / "pf-home")
    pf_env16 = {**pf_env, "PF_WORKER_COUNT": "16"}
    pf = _common.pf_argv(python)
    subprocess.run([*pf, "config", "set", "telemetry.enabled=false"], env=pf_env, cwd=tmp,
                   capture_output=True)  # no waiting on an unreachable telemetry endpoint

    sleepy, chat, echo = (copy_flow(f, tmp) for f in ("sleepy", "llm_chat", "echo"))
    chat2 = _common.copy_flow(FLOWS / "llm_chat", tmp / "llm_chat_medium")  # its own session
    data = {
        "sleep": jsonl(tmp / "sleep.jsonl", [{"seconds": "0.1"}] * n),
        "llm": jsonl(tmp / "llm.jsonl", [{"question": f"question {i}"} for i in range(n)]),
        "429": jsonl(tmp / "429.jsonl", [{"question": f"q {i}"}
                                         for i in range(args.rate_lines)]),
        "sleep_w": jsonl(tmp / "sleep_w.jsonl", [{"seconds": "0.1"}] * WARMUP),
        "llm_w": jsonl(tmp / "llm_w.jsonl", [{"question": "warm"}] * WARMUP),
    }
    for size in {WARMUP, *echo_sizes}:
        data[f"echo{size}"] = write_data(tmp / f"echo-{size}.jsonl", size)
    llm = LLM(LATENCY)
    limited = LLM(LATENCY, rate=args.rate)
    res: dict = {"cores": cores, "lines": n, "rate": args.rate}
    try:
        print(f"{cores} cores; image {python.parents[1]}; {load()}", flush=True)
        for name, url in (("open_ai_connection", llm.base_url), ("limited", limited.base_url)):
            conn = tmp / f"{name}.yml"
            conn.write_text(f"name: {name}\ntype: open_ai\napi_key: \"sk-test-key\"\n"
                            f"base_url: \"{url}\"\n")
            fs(env, tmp, "connection", "create", "--file", str(conn))
            subprocess.run([*pf, "connection", "create", "--file", str(conn)], env=pf_env,
                           cwd=tmp, capture_output=True, check=True)

        # warm-ups: the local server, each flow's session; pf's service
        t0 = time.perf_counter()
        for flow, d, k in ((sleepy, "sleep_w", WARMUP), (chat, "llm_w", WARMUP),
                           (echo, f"echo{WARMUP}", WARMUP)):
            fs_run(env, tmp, flow, data[d], k)
        if "llm2" in args.cases.split(","):
            fs_run(env, tmp, chat2, data["llm_w"], WARMUP, *MEDIUM)
        print(f"  (warm-up: server + 3 sessions + 3 x {WARMUP}-line runs "
              f"{time.perf_counter() - t0:.1f} s, not counted)", flush=True)
        pf_run(python, sleepy, data["sleep_w"], "pf_warm", pf_env, tmp)

        def case(key: str, flow: Path, d: Path, lines: int, *extra: str, pf_too=True,
                 pf16=True) -> None:
            out = res.setdefault(key, {"lines": lines})
            out["fs"] = fs_run(env, tmp, flow, d, lines, *extra)
            if key.startswith("llm"):  # the endpoint's count before pf's runs add to it
                out["server_after_fs"] = llm.stats()
            print(f"  {key:6s} flowsession {lines:>7,} lines: {out['fs']['wall']:7.2f} s "
                  f"(run {out['fs']['duration']:.2f} s)  {load()}", flush=True)
            for label, e, on in (("pf", pf_env, pf_too), ("pf16", pf_env16, pf16)):
                if not on:
                    continue
                out[label] = pf_run(python, flow, d, f"{key}_{label}", e, tmp)
                print(f"  {key:6s} {label:11s} {lines:>7,} lines: {out[label]['wall']:7.2f} s "
                      f"(pf's duration {out[label]['duration']:.2f} s)  {load()}", flush=True)

        cases = set(args.cases.split(","))
        if "sleep" in cases:
            case("sleep", sleepy, data["sleep"], n)
        if "llm" in cases:
            before = llm.stats()
            case("llm", chat, data["llm"], n, pf_too=True, pf16=True)
            res["llm"]["server"] = {"before": before, "after": llm.stats()}
            res["llm"]["in_flight"] = in_flight(env, tmp, res["llm"], before,
                                                res["llm"]["server_after_fs"])
        if "llm2" in cases:
            before = llm.stats()
            case("llm2", chat2, data["llm"], n, *MEDIUM, pf_too=False, pf16=False)
            res["llm2"]["server"] = {"before": before, "after": llm.stats()}
            res["llm2"]["in_flight"] = in_flight(env, tmp, res["llm2"], before,
                                                 res["llm2"]["server_after_fs"])
            for label in ("pf", "pf16"):  # the same pf runs (same flow, same data)
                if label in res.get("llm", {}):
                    res["llm2"][label] = res["llm"][label]
        if "429" in cases:
            rate_case(res, args, env, tmp, chat, data, limited)
        for size in echo_sizes if "echo" in cases else []:
            key = f"echo{size}"
            case(key, echo, data[key], size, pf_too=not args.skip_pf_echo and size <= 10000,
                 pf16=False)
        res["floor_ms"] = floor_ms(python, echo, 10000, tmp / "floor.json")
    finally:
        stop(llm, limited, env, pf, pf_env, tmp, [sleepy, chat, chat2, echo])
    report(res, args)


def stop(llm: LLM, limited: LLM, env: dict, pf: list, pf_env: dict, tmp: Path,
         flows: list[Path]) -> None:
    llm.stop()
    limited.stop()
    for flow in flows:  # the sessions outlive the server: stop them first
        subprocess.run([str(EXE), "session", "stop", str(flow)], env=env, cwd=tmp,
                       capture_output=True)
    subprocess.run([str(EXE), "server", "stop"], env=env, capture_output=True)
    subprocess.run([*pf, "service", "stop"], env=pf_env, cwd=tmp, capture_output=True)
    shutil.rmtree(tmp, ignore_errors=True)


def in_flight(env: dict, tmp: Path, case: dict, before: dict, after: dict) -> dict:
    """Lines in flight during a case's run (asked after it: not timed): the run's average
    (summed line durations / run duration) and the endpoint's (its answers x latency / run
    duration: the requests it was serving at once, on average)."""
    _, details = fs(env, tmp, "run", "show-details", case["fs"]["name"], "--all-results",
                    "--json")
    busy = sum(d.get("duration") or 0 for d in details)
    answered = after["answered"] - before["answered"]
    run_s = case["fs"]["duration"]
    return {"run": busy / run_s if run_s else 0.0,
            "endpoint": answered * LATENCY / run_s if run_s else 0.0, "answered": answered,
            "peak_since_start": after["most_in_flight"]}


def rate_case(res: dict, args, env: dict, tmp: Path, chat: Path, data: dict,
              limited: LLM) -> None:
    """(c): the rate-limited server (the connection override points the node at it)."""
    s0 = limited.stats()
    res["429"] = {"lines": args.rate_lines}
    res["429"]["fs"] = fs_run(env, tmp, chat, data["429"], args.rate_lines,
                              "--connections", "chat.connection=limited")
    s1 = limited.stats()
    res["429"]["server"] = {"before": s0, "after": s1}
    print(f"  429    flowsession {args.rate_lines:>7,} lines: "
          f"{res['429']['fs']['wall']:7.2f} s; server {s1}", flush=True)


def report(res: dict, args) -> None:
    cores = res["cores"]
    print(f"\nLLM-bound batch runs, whole commands, {cores} cores; flowsession at its default "
          f"concurrency ({DEFAULT_CONCURRENCY} lines in flight); {load()}\n")
    print(f"{'case':34s}{'lines':>8s}{'fs s':>8s}{'pf s':>8s}{'pf16 s':>8s}{'x pf':>8s}"
          f"{'x pf16':>8s}{'fs run s':>10s}")
    verdicts = []
    for key, label in (("sleep", "(a) python node, sleep 100 ms"),
                       ("llm", "(b) llm node, 100 ms endpoint"),
                       ("llm2", "(b2) = (b), session of 2 vCPU")):
        if key not in res or "pf" not in res[key]:
            continue
        r = res[key]
        f, p, p16 = r["fs"]["wall"], r["pf"]["wall"], r["pf16"]["wall"]
        r["x_pf"], r["x_pf16"] = p / f, p16 / f
        # achieved concurrency: for llm the endpoint's average requests in flight; for the
        # sleep node the lines' sleeping time over the run's duration
        r["achieved_concurrency"] = (r["in_flight"]["endpoint"] if "in_flight" in r
                                     else r["lines"] * LATENCY / r["fs"]["duration"])
        print(f"{label:34s}{r['lines']:>8,}{f:>8.2f}{p:>8.2f}{p16:>8.2f}{r['x_pf']:>8.1f}"
              f"{r['x_pf16']:>8.1f}{r['fs']['duration']:>10.2f}")
        verdicts.append((f"{key}: x pf {r['x_pf']:.1f} >= 10", r["x_pf"] >= 10))
        verdicts.append((f"{key}: x pf16 {r['x_pf16']:.1f} >= 3", r["x_pf16"] >= 3))
        verdicts.append((f"{key}: achieved concurrency {r['achieved_concurrency']:.1f} >= "
                         f"0.8 x {DEFAULT_CONCURRENCY}",
                         r["achieved_concurrency"] >= 0.8 * DEFAULT_CONCURRENCY))
    c = res.get("429")
    if c is not None:
        rate_report(c, args, verdicts)
    floor_cores = 1000 / res["floor_ms"] * cores
    for key in [k for k in res if k.startswith("echo")]:
        r = res[key]
        f = r["fs"]["wall"]
        p = r.get("pf", {}).get("wall")
        r["run_lines_per_s"] = r["lines"] / r["fs"]["duration"]
        print(f"{'(d) echo':34s}{r['lines']:>8,}{f:>8.2f}"
              f"{(f'{p:.2f}' if p else '-'):>8s}{'-':>8s}"
              f"{(f'{p / f:.1f}' if p else '-'):>8s}{'-':>8s}{r['fs']['duration']:>10.2f}")
        if p:
            verdicts.append((f"{key}: x pf {p / f:.1f} >= 30", p / f >= 30))
        verdicts.append((f"{key}: run {r['run_lines_per_s']:.0f} lines/s >= 0.6 x floor x "
                         f"cores {floor_cores:.0f}", r["run_lines_per_s"] >= 0.6 * floor_cores))
    print(f"\nfloor: {res['floor_ms']:.3f} ms/line; floor x cores {floor_cores:.0f} lines/s")
    if "llm" in res:
        print(f"(b) token usage (run show system_metrics): "
              f"{res['llm']['fs'].get('system_metrics')}")
    for key in ("llm", "llm2"):
        if key in res:
            f = res[key]["in_flight"]
            print(f"({'b' if key == 'llm' else 'b2'}) lines in flight, average: run "
                  f"{f['run']:.1f}, endpoint {f['endpoint']:.1f} ({f['answered']} answers)")
    if c is not None:
        print(f"(c) throttle (run show): {c['fs'].get('throttle')}")
    print()
    for text, ok in verdicts:
        print(f"  {'PASS' if ok else 'FAIL'}  {text}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, default=str) + "\n")


def rate_report(c: dict, args, verdicts: list) -> None:
    a, b = c["server"]["before"], c["server"]["after"]
    answered = b["answered"] - a["answered"]
    span = (b["last"] - (b["first"] if a["first"] is None else b["first"])) if b["last"] else 0
    c["achieved_rate"] = answered / span if span else 0.0
    c["rate_limited"] = b["rate_limited"] - a["rate_limited"]
    print(f"{'(c) llm, endpoint at ' + str(int(args.rate)) + ' req/s':34s}"
          f"{c['lines']:>8,}{c['fs']['wall']:>8.2f}{'':>8s}{'':>8s}{'':>8s}{'':>8s}"
          f"{c['fs']['duration']:>10.2f}")
    verdicts.append((f"429: achieved {c['achieved_rate']:.1f} req/s >= 0.9 x {args.rate:g}",
                     c["achieved_rate"] >= 0.9 * args.rate))
    verdicts.append((f"429: {c['fs']['failed']} failed lines (429s answered: "
                     f"{c['rate_limited']})", c["fs"]["failed"] == 0))


if __name__ == "__main__":
    main()

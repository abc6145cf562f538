"""Compatibility, measured against prompt flow itself, flow by flow.

Given a checkout of microsoft/promptflow, every flow folder under
``src/promptflow/tests/test_configs/flows/`` and ``eager_flows/`` is considered. Those that can
run offline (no LLM, no connection, no network, no C#, no packages to install) are run as a
batch run twice, on the same data: by ``pf run create`` (promptflow-devkit, in the default
image) and by ``flowsession run create`` (a real server, sessions started as a user's would
be). Per line, the status (Completed/Failed), the outputs and the kind of error are compared,
and so are the run's metrics; see compat_doc.TOLERANCES. The table goes to docs/compatibility.md.

    .venv/bin/python bench/compat.py --promptflow /tmp/promptflow-src [--jobs 2]
        [--only NAME[,NAME...]] [--limit N] [--lines 10] [--doc docs/compatibility.md]
        [--json results.json] [--keep]

``--only`` / ``--limit`` make a partial pass (the document is then not written unless --doc
is given). Each flow's sessions are stopped when it is done; the server is stopped at the end.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compat_doc import document  # noqa: E402
from compat_flows import Flow, discover  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FS = REPO / ".venv" / "bin" / "flowsession"
CONFIGS = Path("src/promptflow/tests/test_configs")
TIMEOUT_S = 600




@dataclass
class Side:
    """One tool's view of a run."""
    refused: bool = False  # no line ran: the run was refused (or failed before any line)
    error: str = ""
    lines: dict[int, dict[str, Any]] = field(default_factory=dict)  # n -> status/outputs/error
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class Result:
    name: str
    kind: str  # dag | flex
    skipped: str = ""  # why the flow was left out
    verdict: str = ""  # pass | fail | intended | skip
    difference: str = ""  # the first difference
    lines: int = 0
    pf_seconds: float = 0.0
    fs_seconds: float = 0.0


# --- running ----------------------------------------------------------------------------------

def _run(cmd: list[str], env: dict[str, str], cwd: Path, log: Path,
         timeout: float = TIMEOUT_S) -> int:
    with open(log, "ab") as out:
        try:
            return subprocess.run(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, timeout=timeout,
                                  check=False).returncode
        except subprocess.TimeoutExpired:
            out.write(f"\n[compat] timed out after {timeout} s\n".encode())
            return -1


def run_pf(pf: str, flow: Path, data: Path, name: str, env: dict[str, str], work: Path,
           init: dict[str, Any] | None) -> Side:
    log = work / f"{name}.pf.log"
    cmd = [pf, "run", "create", "--flow", str(flow), "--data", str(data), "--name", name]
    if init:
        cmd += ["--init", *[f"{k}={_arg(v)}" for k, v in init.items()]]
    started = time.monotonic()
    _run(cmd, env, work, log)
    side = read_pf(Path(env["HOME"]) / ".promptflow" / ".runs" / name, log)
    side.seconds = time.monotonic() - started
    return side


def read_pf(run_dir: Path, log: Path) -> Side:
    """pf's run as it left it: its per-line records, outputs and metrics."""
    side = Side()
    outputs = {}
    out_file = run_dir / "flow_outputs" / "output.jsonl"
    if out_file.is_file():
        for raw in out_file.read_text().splitlines():
            row = inline_images(json.loads(raw), out_file.parent)
            outputs[row.get("line_number")] = row
    for f in sorted((run_dir / "flow_artifacts").glob("*.jsonl")) \
            if (run_dir / "flow_artifacts").is_dir() else []:
        for raw in f.read_text().splitlines():
            rec = json.loads(raw)
            n, info = rec.get("line_number"), rec.get("run_info") or {}
            status = info.get("status")
            side.lines[n] = {"status": "Completed" if status == "Completed" else "Failed",
                             "outputs": outputs.get(n) if status == "Completed" else None,
                             "error": (info.get("error") or {}).get("message") or ""}
    metrics = run_dir / "metrics.json"
    if metrics.is_file():
        side.metrics = json.loads(metrics.read_text() or "{}")
    if not side.lines:
        side.refused = True
        text = log.read_text(errors="replace") if log.exists() else ""
        side.error = _first_error(text)
    return side


_PATH_KEY = re.compile(r"^data:([\w/.+-]+);path$")


def inline_images(value: Any, folder: Path) -> Any:
    """pf's images saved beside its outputs ({"data:image/png;path": "x.png"}, or
    openai-vision's {"type": "image_file", "image_file": {"path": ...}}) read back into the
    inline form flowsession gives ({"data:image/png;base64": ...} / {"type": "image_url",
    ...}), so that the bytes are compared."""
    import base64
    import mimetypes

    def b64(path: str) -> str | None:
        f = folder / path
        return base64.b64encode(f.read_bytes()).decode() if f.is_file() else None

    if isinstance(value, dict):
        if len(value) == 1:
            (k, v), = value.items()
            m = _PATH_KEY.match(str(k))
            if m and isinstance(v, str) and (data := b64(v)) is not None:
                return {f"data:{m.group(1)};base64": data}
        if value.get("type") == "image_file" and isinstance(value.get("image_file"), dict):
            path = value["image_file"].get("path")
            data = b64(path) if isinstance(path, str) else None
            if data is not None:
                mime = mimetypes.guess_type(path)[0] or "image/*"
                return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}}
        return {k: inline_images(v, folder) for k, v in value.items()}
    if isinstance(value, list):
        return [inline_images(v, folder) for v in value]
    return value


def run_fs(flow: Path, data: Path, name: str, env: dict[str, str], work: Path,
           init: dict[str, Any] | None) -> Side:
    log = work / f"{name}.fs.log"
    cmd = [str(FS), "run", "create", "--flow", str(flow), "--data", str(data), "--name", name]
    for k, v in (init or {}).items():
        cmd += ["--init", f"{k}={_arg(v)}"]
    started = time.monotonic()
    code = _run(cmd, env, work, log)
    side = Side(seconds=time.monotonic() - started)
    try:
        if code != 0:
            shown = _json([str(FS), "run", "show", name, "--json"], env, work)
            if shown is None:  # refused before it was made
                side.refused = True
                side.error = _first_error(log.read_text(errors="replace"))
                return side
        details = _json([str(FS), "run", "show-details", name, "--all-results", "--json"],
                        env, work) or []
        for row in details:
            if row.get("status") == "NotStarted":
                continue
            side.lines[row["line_number"]] = {
                "status": row["status"], "outputs": row.get("outputs"),
                "error": row.get("error") or ""}
        side.metrics = _json([str(FS), "run", "show-metrics", name, "--json"], env, work) or {}
        if not side.lines:
            side.refused = True
            shown = _json([str(FS), "run", "show", name, "--json"], env, work) or {}
            side.error = str(shown.get("error") or _first_error(log.read_text(errors="replace")))
    finally:
        subprocess.run([str(FS), "session", "stop", str(flow)], env=env, cwd=work,
                       capture_output=True, timeout=120, check=False)
    return side


def _arg(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _json(cmd: list[str], env: dict[str, str], cwd: Path) -> Any:
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=120,
                          check=False)
    if proc.returncode != 0:
        return None
    try:
        return json.loads(proc.stdout)
    except ValueError:
        return None


def _first_error(text: str) -> str:
    for line in text.splitlines():
        s = line.strip()
        if s.startswith(("error:", "Error:", '"message":')) or "Exception" in s[:40]:
            return s[:300]
    return text.strip().splitlines()[-1][:300] if text.strip() else ""


# --- comparing --------------------------------------------------------------------------------

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)
_TIME = re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:?\d\d)?")
_KIND = re.compile(r"\(([A-Z][A-Za-z0-9_]*(?:Error|Exception|Exit|Interrupt|Warning))\)")


def normalise(value: Any, paths: list[str]) -> Any:
    if isinstance(value, dict):
        return {k: "<id>" if _is_id(k, v) else normalise(v, paths)
                for k, v in value.items() if k != "line_number"}
    if isinstance(value, list):
        return [normalise(v, paths) for v in value]
    if isinstance(value, str):
        for p in paths:
            value = value.replace(p, "<flow>")
        value = re.sub(r"/session/flow/[0-9a-f]+", "<flow>", value)
        return _TIME.sub("<time>", _UUID.sub("<uuid>", value))
    return value


def _is_id(key: Any, value: Any) -> bool:
    """An object's id (``id(self)``), a process id: different in every process."""
    return (isinstance(key, str) and re.search(r"(^|_)(id|pid)$", key) is not None
            and type(value) is int)


def same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
            return True
        return a == b or math.isclose(a, b, rel_tol=1e-6)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def error_kind(message: str) -> str | None:
    m = _KIND.search(message or "")
    return m.group(1) if m else None


def compare(pf: Side, fs: Side, paths: list[str]) -> str:
    """The first difference, or "" when they agree."""
    if pf.refused:
        if fs.refused or all(v["status"] == "Failed" for v in fs.lines.values()):
            return ""
        return f"pf refused the run ({pf.error or 'no line ran'}); flowsession ran it"
    if fs.refused:
        return f"flowsession refused the run ({fs.error}); pf ran it"
    for n in sorted(set(pf.lines) | set(fs.lines), key=lambda x: (x is None, x)):
        p, f = pf.lines.get(n), fs.lines.get(n)
        if p is None or f is None:
            return f"line {n}: {'pf' if p is None else 'flowsession'} has no record of it"
        if p["status"] != f["status"]:
            why = f["error"] if f["status"] == "Failed" else p["error"]
            return (f"line {n}: pf {p['status']}, flowsession {f['status']}"
                    + (f" ({_short(why)})" if why else ""))
        if p["status"] == "Completed":
            po, fo = normalise(p["outputs"] or {}, paths), normalise(f["outputs"] or {}, paths)
            if not same(po, fo):
                return f"line {n}: outputs differ: pf {_short(po)}, flowsession {_short(fo)}"
        else:
            pk, fk = error_kind(p["error"]), error_kind(f["error"])
            if pk and fk and pk != fk:
                return f"line {n}: pf failed with {pk}, flowsession with {fk}"
    pm, fm = normalise(pf.metrics, paths), normalise(fs.metrics, paths)
    if not same(pm, fm):
        return f"metrics differ: pf {_short(pm)}, flowsession {_short(fm)}"
    return ""


def _short(value: Any, n: int = 120) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str,
                                                           ensure_ascii=False)
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= n else text[: n - 3] + "..."


# --- one flow ---------------------------------------------------------------------------------

# differences that are meant: flow -> why
INTENDED = {
    "dag/aggregation_node_failed":
        "the flow names a requirements file that does not exist: flowsession builds the "
        "flow's environment from it and refuses the run naming the file; pf, which installs "
        "nothing, ignores the field",
    "flex/flow_with_dataclass_output":
        "pf hands the entry's list default to the executor as the text "
        "\"['default_model']\" and fails every line parsing it as JSON; flowsession gives "
        "the entry its default list",
}


# known failures, and where they are being fixed: flow -> note
NOTES = {
    "flex/basic_callable_class": "issue 10 item 3: prompt flow's runtime image names are to "
                                 "run on the default image",
}


def pf_key(ctx: dict[str, Any], flow: Flow, data: Path) -> str:
    """What pf's result depends on: the flow folder's files, the data, init, pf's version."""
    h = hashlib.sha256(f"{ctx['pf_version']}\n{json.dumps(flow.init)}\n".encode())
    h.update(data.read_bytes())
    folder = ctx["configs"] / flow.rel
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not {".promptflow", "__pycache__"} & set(p.parts):
            h.update(str(p.relative_to(folder)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def one(flow: Flow, ctx: dict[str, Any]) -> Result:
    res = Result(flow.name, flow.kind, skipped=flow.skip)
    if flow.skip:
        res.verdict = "skip"
        return res
    work: Path = ctx["work"]
    run = re.sub(r"[^A-Za-z0-9_]", "_", f"{flow.kind}_{flow.name}")
    data = work / "data" / f"{run}.jsonl"
    data.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in flow.data))
    res.lines = len(flow.data)
    pf_flow = ctx["pf_tree"] / flow.rel
    fs_flow = ctx["fs_tree"] / flow.rel
    cache = ctx["pf_cache"] / f"{run}.{pf_key(ctx, flow, data)}.json" if ctx["pf_cache"] else None
    with cf.ThreadPoolExecutor(2) as pool:
        if cache is not None and cache.is_file():
            pf_f = None
            text = cache.read_text().replace("<pf-tree>", str(ctx["pf_tree"]))
            pf = Side(**json.loads(text))
            pf.lines = {int(k) if str(k).isdigit() else k: v for k, v in pf.lines.items()}
        else:
            pf_f = pool.submit(run_pf, ctx["pf"], pf_flow, data, run, ctx["pf_env"], work,
                               flow.init)
        fs_f = pool.submit(run_fs, fs_flow, data, run, ctx["fs_env"], work, flow.init)
        if pf_f is not None:
            pf = pf_f.result()
            if cache is not None:
                cache.write_text(json.dumps(asdict(pf), default=str)
                                 .replace(str(ctx["pf_tree"]), "<pf-tree>"))
        fs = fs_f.result()
    res.pf_seconds, res.fs_seconds = round(pf.seconds, 1), round(fs.seconds, 1)
    paths = sorted({str(pf_flow), str(fs_flow), str(pf_flow.resolve()), str(fs_flow.resolve())},
                   key=len, reverse=True)
    res.difference = compare(pf, fs, paths)
    res.verdict = "fail" if res.difference else "pass"
    if res.difference and f"{flow.kind}/{flow.name}" in NOTES:
        res.difference = f"[{NOTES[f'{flow.kind}/{flow.name}']}] {res.difference}"
    if res.difference and f"{flow.kind}/{flow.name}" in INTENDED:
        res.verdict = "intended"
        res.difference = f"{INTENDED[f'{flow.kind}/{flow.name}']} ({res.difference})"
    if res.verdict == "pass" and pf.refused:
        res.difference = "both refuse the run"
    (work / f"{run}.sides.json").write_text(json.dumps(
        {"pf": asdict(pf), "flowsession": asdict(fs)}, default=str, indent=1))
    return res


# --- main -------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--promptflow", type=Path, required=True,
                        help="a checkout of microsoft/promptflow")
    parser.add_argument("--only", default="", help="flow folder names, comma-separated")
    parser.add_argument("--limit", type=int, default=0, help="at most N runnable flows")
    parser.add_argument("--jobs", type=int, default=2, help="flows compared at once")
    parser.add_argument("--lines", type=int, default=10, help="data lines per flow, at most")
    parser.add_argument("--doc", type=Path, help="write the document here (default: "
                        "docs/compatibility.md for a full pass)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--commit", default="", help="the checkout's commit, when it is not "
                        "a git work tree (e.g. an archive)")
    parser.add_argument("--pf-cache", type=Path, default=Path(tempfile.gettempdir()) /
                        "fs-compat-pf-cache", help="pf's results, kept by the flow's content, "
                        "data and pf's version, so a second pass runs pf only where they "
                        "changed (--pf-cache '' to run pf every time)")
    args = parser.parse_args()

    configs = args.promptflow / CONFIGS
    if not configs.is_dir():
        raise SystemExit(f"error: no {CONFIGS} in {args.promptflow}: give a checkout of "
                         "microsoft/promptflow")
    flows = discover(configs, max_lines=args.lines)
    if args.only:
        wanted = set(args.only.split(","))
        flows = [f for f in flows if f.name in wanted or f"{f.kind}/{f.name}" in wanted]
    if args.limit:
        runnable = [f for f in flows if not f.skip][: args.limit]
        flows = runnable
    work = Path(tempfile.mkdtemp(prefix="fs-compat-"))
    (work / "data").mkdir()
    print(f"{len(flows)} flow(s), {sum(1 for f in flows if not f.skip)} to run; work in {work}",
          flush=True)
    ctx = setup(work, configs)
    ctx["pf_cache"] = args.pf_cache if str(args.pf_cache) not in ("", ".") else None
    if ctx["pf_cache"]:
        ctx["pf_cache"].mkdir(parents=True, exist_ok=True)
    results: list[Result] = []
    try:
        with cf.ThreadPoolExecutor(max(1, args.jobs)) as pool:
            futures = {pool.submit(one, f, ctx): f for f in flows}
            for fut in cf.as_completed(futures):
                try:
                    r = fut.result()
                except Exception as exc:  # noqa: BLE001 - the harness's own failure, reported
                    f = futures[fut]
                    r = Result(f.name, f.kind, verdict="fail", difference=f"harness: {exc}")
                results.append(r)
                if r.verdict != "skip":
                    print(f"  {r.verdict:4s} {r.kind}/{r.name} (pf {r.pf_seconds} s, "
                          f"flowsession {r.fs_seconds} s) {r.difference}", flush=True)
    finally:
        teardown(ctx)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    ran = [r for r in results if r.verdict != "skip"]
    passed = sum(1 for r in ran if r.verdict == "pass")
    intended = sum(1 for r in ran if r.verdict == "intended")
    print(f"\n{len(results)} considered, {len(ran)} run, {passed} pass, {intended} differ as "
          f"intended, {len(ran) - passed - intended} fail, {len(results) - len(ran)} left out")
    meta = {"commit": args.commit or ctx.get("commit"), "pf_version": ctx.get("pf_version"),
            "when": time.strftime("%Y-%m-%d"), "lines": args.lines}
    doc = args.doc or (None if (args.only or args.limit) else REPO / "docs/compatibility.md")
    if doc:
        doc.write_text(document(results, meta))
        print(f"wrote {doc}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 0


def setup(work: Path, configs: Path) -> dict[str, Any]:
    """Two copies of the test configs (pf writes into flow folders), pf's home, and a
    flowsession home whose server the first command starts."""
    ignore = shutil.ignore_patterns(".promptflow", "__pycache__", ".runs")
    shutil.copytree(configs, work / "pf-tree", ignore=ignore, symlinks=True)
    shutil.copytree(configs, work / "fs-tree", ignore=ignore, symlinks=True)
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("FLOWSESSION_", "PF_", "PROMPTFLOW_"))}
    fs_env = {**base, "FLOWSESSION_HOME": str(work / "fs-home"), "COLUMNS": "200",
              "NO_COLOR": "1", "FLOWSESSION_VCPU_QUOTA": "64"}
    for key in ("FLOWSESSION_IMAGES_DIR", "FLOWSESSION_STANDBY_POOL"):
        if key in os.environ:
            fs_env[key] = os.environ[key]
    image = _json([str(FS), "image", "build", "--json"], fs_env, work) or {}
    path = image.get("path") or (_json([str(FS), "image", "show", "flowsession/runtime:1",
                                        "--json"], fs_env, work) or {}).get("path")
    if not path:
        raise SystemExit("error: the default image did not build (flowsession image build)")
    pf = str(Path(path) / "bin" / "pf")
    pf_home = work / "pf-home"
    pf_env = {**base, "HOME": str(pf_home), "PF_WORKER_COUNT": "1", "PF_BATCH_METHOD": "fork"}
    (pf_home / ".promptflow").mkdir(parents=True)
    (pf_home / ".promptflow" / "pf.yaml").write_text(
        "telemetry:\n  enabled: 'false'\ntrace:\n  destination: none\n")
    version = subprocess.run([pf, "--version"], env=pf_env, capture_output=True, text=True,
                             check=False).stdout
    m = re.search(r'"promptflow":\s*"([^"]+)"', version)
    commit = subprocess.run(["git", "-C", str(configs), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, check=False).stdout.strip()
    return {"work": work, "configs": configs, "pf_tree": work / "pf-tree", "fs_tree": work / "fs-tree", "pf": pf,
            "pf_env": pf_env, "fs_env": fs_env, "commit": commit or "(not a git checkout)",
            "pf_version": f"promptflow {m.group(1)}" if m else "promptflow (version unknown)"}


def teardown(ctx: dict[str, Any]) -> None:
    subprocess.run([str(FS), "server", "stop"], env=ctx["fs_env"], cwd=ctx["work"],
                   capture_output=True, timeout=120, check=False)
    subprocess.run([ctx["pf"], "service", "stop"], env=ctx["pf_env"], cwd=ctx["work"],
                   capture_output=True, timeout=60, check=False)


if __name__ == "__main__":
    raise SystemExit(main())

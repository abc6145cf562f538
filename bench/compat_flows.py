"""bench/compat.py's part that reads prompt flow's test flows: which can run offline, and the
data each one runs on. Reads files only (yaml, code as text, ast); never imports a flow."""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOTS = {"flows": "dag", "eager_flows": "flex"}
FLOW_FILES = ("flow.dag.yaml", "flow.dag.yml", "flow.flex.yaml", "flow.flex.yml")

NETWORK = re.compile(r"^\s*(import|from)\s+(openai|requests|urllib|httpx|aiohttp|http\.client|"
                     r"bs4|azure|langchain|socket)\b", re.M)
CONNECTION = re.compile(r"\b\w*Connection\b|\bmodel_config\b|ModelConfiguration")
LLM_CODE = re.compile(r"\bPrompty\b|\bpromptflow\.tools\b|\bAzureOpenAI\b|\bOpenAI\(")
SLEEP = re.compile(r"\bsleep\(\s*(\d+(?:\.\d+)?)\s*\)")
SLOW_SECONDS = 10
RANDOM = re.compile(r"^\s*(import random|from random import)", re.M)


@dataclass
class Flow:
    name: str
    kind: str  # dag | flex
    rel: str  # the folder, relative to test_configs
    skip: str = ""  # why it is left out
    data: list[dict[str, Any]] = field(default_factory=list)
    init: dict[str, Any] | None = None


def discover(configs: Path, *, max_lines: int) -> list[Flow]:
    out = []
    for root, kind in ROOTS.items():
        for folder in sorted(p for p in (configs / root).iterdir() if p.is_dir()):
            flow = Flow(folder.name, kind, f"{root}/{folder.name}")
            try:
                classify(folder, flow, max_lines)
            except Exception as exc:  # noqa: BLE001 - a folder we cannot read is left out
                flow.skip = f"unreadable: {type(exc).__name__}: {exc}"
            out.append(flow)
    return out


def classify(folder: Path, flow: Flow, max_lines: int) -> None:
    yml = next((folder / n for n in FLOW_FILES if (folder / n).is_file()), None)
    if yml is None:
        flow.skip = "no flow.dag.yaml or flow.flex.yaml (not a folder `pf run create` takes)"
        return
    text = yml.read_text(errors="replace")
    spec = yaml.safe_load(text) or {}
    if not isinstance(spec, dict):
        flow.skip = "the flow's yaml is not a mapping"
        return
    code = "\n".join(p.read_text(errors="replace") for p in sorted(folder.rglob("*.py"))
                     if p.is_file() and ".promptflow" not in p.parts)
    why = offline_problem(folder, spec, text, code)
    if why:
        flow.skip = why
        return
    reqs = folder / "requirements.txt"
    if reqs.is_file() and any(x.strip() and not x.strip().startswith("#")
                              for x in reqs.read_text().splitlines()):
        flow.skip = "installs packages: requirements.txt (pf does not install them; needs the network)"
        return
    if (folder / "init.json").is_file():
        init = json.loads((folder / "init.json").read_text())
        flow.init = init if isinstance(init, dict) else None
    flow.data = sample_data(folder, spec, max_lines)
    if not flow.data:
        flow.skip = "no sample data: no .jsonl in its folder and inputs without defaults"


def offline_problem(folder: Path, spec: dict[str, Any], text: str, code: str) -> str:
    if spec.get("language") == "csharp" or any(
            p.suffix in (".cs", ".csproj", ".dll") for p in folder.rglob("*")):
        return "C#"
    nodes = spec.get("nodes") or []
    for node in nodes if isinstance(nodes, list) else []:
        if not isinstance(node, dict):
            continue
        if node.get("type") in ("llm", "custom_llm") or node.get("api") or node.get("provider"):
            return f"LLM: node `{node.get('name')}` is an LLM node"
        src = node.get("source") or {}
        if isinstance(src, dict) and str(src.get("path", "")).endswith(".prompty"):
            return f"LLM: node `{node.get('name')}` is a prompty"
        if "connection" in node or any("connection" in str(k).lower()
                                       for k in (node.get("inputs") or {})):
            return f"connection: node `{node.get('name')}` takes one"
        if isinstance(src, dict) and src.get("type") == "package":
            return f"package tool `{src.get('tool')}` (a connection or an outside service)"
        if node.get("type") == "assistant" or "assistant" in str(src):
            return "LLM: an assistant node"
    for name, decl in (spec.get("inputs") or {}).items():
        if isinstance(decl, dict) and "connection" in str(decl.get("type", "")).lower():
            return f"connection: input `{name}` is a connection"
    env = spec.get("environment_variables") or {}
    if isinstance(env, dict) and any("${" in str(v) for v in env.values()):
        return "connection: environment_variables refer to a connection"
    if any(folder.rglob("*.prompty")):
        return "LLM: a .prompty file"
    m = NETWORK.search(code)
    if m:
        return f"network: its code imports {m.group(2)}"
    if LLM_CODE.search(code):
        return "LLM: its code calls an LLM"
    if CONNECTION.search(code) or "connection" in json.dumps(spec.get("init") or {}).lower():
        return "connection: its code takes a connection or a model configuration"
    if RANDOM.search(code):
        return "random by design: its code imports random (outputs or failures differ run to run)"
    slow = [float(s) for s in SLEEP.findall(code)]
    if slow and max(slow) >= SLOW_SECONDS:
        return f"slow by design: sleeps {max(slow):g} s"
    return ""


def sample_data(folder: Path, spec: dict[str, Any], max_lines: int) -> list[dict[str, Any]]:
    files = sorted(folder.glob("*.jsonl"), key=lambda p: (_rank(p.name), p.name))
    for f in files:
        rows = []
        for raw in f.read_text(errors="replace").splitlines():
            if raw.strip():
                try:
                    row = json.loads(raw)
                except ValueError:
                    rows = []
                    break
                if isinstance(row, dict):
                    rows.append(row)
            if len(rows) >= max_lines:
                break
        if rows:
            return rows
    for f in sorted(folder.glob("*.json"), key=lambda p: (_rank(p.name), p.name)):
        if f.name in ("init.json",) or f.name.endswith(".meta.json"):
            continue
        try:
            value = json.loads(f.read_text())
        except ValueError:
            continue
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            return value[:max_lines]
    return defaults_line(folder, spec)


def _rank(name: str) -> int:
    return 0 if any(w in name for w in ("data", "input", "sample")) else 1


def defaults_line(folder: Path, spec: dict[str, Any]) -> list[dict[str, Any]]:
    """One line of the inputs' defaults; [] when an input has none."""
    inputs = spec.get("inputs")
    if isinstance(inputs, dict) and inputs:
        line = {}
        for name, decl in inputs.items():
            if not isinstance(decl, dict) or "default" not in decl:
                return []
            line[name] = decl["default"]
        return [line]
    entry = spec.get("entry")
    if isinstance(entry, str):  # a flex flow: the entry's signature
        params = entry_params(folder, entry)
        if params is None or any(not has_default for _, has_default in params):
            return []
    return [{}]


def entry_params(folder: Path, entry: str) -> list[tuple[str, bool]] | None:
    """(name, has a default) of a flex entry's parameters, from its source; None: unknown."""
    module, _, attr = entry.partition(":")
    path = folder / (module.replace(".", "/") + ".py")
    if not path.is_file() or not attr:
        return None
    tree = ast.parse(path.read_text(errors="replace"))
    for node in tree.body:
        fn = None
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == attr:
            fn = node
        elif isinstance(node, ast.ClassDef) and node.name == attr:
            fn = next((n for n in node.body if isinstance(n, (ast.FunctionDef,
                                                               ast.AsyncFunctionDef))
                       and n.name == "__call__"), None)
        if fn is not None:
            args = [a.arg for a in fn.args.args if a.arg != "self"]
            n_defaults = len(fn.args.defaults)
            return [(a, i >= len(args) - n_defaults) for i, a in enumerate(args)]
    return None

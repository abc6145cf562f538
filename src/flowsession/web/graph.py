"""A flow's graph for the flow page: boxes and edges laid out in layers, from the text of its
``flow.dag.yaml`` (or ``flow.flex.yaml``). Presentation only: it reads the YAML the API
returned and draws what it declares (inputs, nodes by type, activate conditions, aggregation
nodes, outputs; a flex flow's entry)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

REF = re.compile(r"\$\{([A-Za-z0-9_.\-]+)\}")
BOX_W, BOX_H, GAP_X, GAP_Y, PAD = 190, 46, 30, 64, 16


@dataclass
class Box:
    id: str
    label: str
    kind: str  # inputs | outputs | python | llm | prompt | ... | entry
    detail: str = ""
    aggregation: bool = False
    activate: str = ""
    x: int = 0
    y: int = 0
    layer: int = 0


@dataclass
class Edge:
    src: str
    dst: str
    dashed: bool = False  # an activate condition
    path: str = ""


@dataclass
class Graph:
    boxes: list[Box] = field(default_factory=list)
    edges: list[Edge] = field(default_factory=list)
    width: int = 0
    height: int = 0
    error: str = ""
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    flex: bool = False


def _refs(value: Any) -> set[str]:
    """The ``inputs`` / node names that ``${...}`` references in ``value`` point at."""
    found: set[str] = set()
    if isinstance(value, str):
        for ref in REF.findall(value):
            head = ref.split(".")[0]
            found.add("inputs" if head == "inputs" else head)
    elif isinstance(value, dict):
        for v in value.values():
            found |= _refs(v)
    elif isinstance(value, list):
        for v in value:
            found |= _refs(v)
    return found


def _inputs(doc: dict) -> dict[str, dict[str, Any]]:
    raw = doc.get("inputs") or {}
    out = {}
    if isinstance(raw, dict):
        for name, spec in raw.items():
            spec = spec if isinstance(spec, dict) else {"type": "string", "default": spec}
            out[str(name)] = {"type": str(spec.get("type", "string")),
                              "default": spec.get("default"),
                              "is_chat_input": bool(spec.get("is_chat_input")),
                              "is_chat_history": bool(spec.get("is_chat_history"))}
    return out


def build(text: str, *, flex: bool = False) -> Graph:
    """The laid-out graph of a flow file's ``text`` (a YAML error is the graph's ``error``)."""
    graph = Graph(flex=flex)
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        graph.error = f"the flow file is not valid YAML: {exc}"
        return graph
    if not isinstance(doc, dict):
        graph.error = "the flow file is not a mapping"
        return graph
    graph.inputs = _inputs(doc)
    boxes: dict[str, Box] = {}
    deps: dict[str, set[str]] = {}
    inputs_label = ", ".join(graph.inputs) or "none"
    boxes["inputs"] = Box("inputs", "inputs", "inputs", inputs_label)
    deps["inputs"] = set()
    if flex:
        entry = str(doc.get("entry", "?"))
        boxes["entry"] = Box("entry", "entry", "entry", entry)
        deps["entry"] = {"inputs"}
        outs = doc.get("outputs") or {}
        boxes["outputs"] = Box("outputs", "outputs", "outputs",
                               ", ".join(map(str, outs)) if isinstance(outs, dict) else "")
        deps["outputs"] = {"entry"}
        dashed: set[tuple[str, str]] = set()
    else:
        dashed = set()
        for node in doc.get("nodes") or []:
            if not isinstance(node, dict) or not node.get("name"):
                continue
            name = str(node["name"])
            source = node.get("source") or {}
            detail = source.get("path") or source.get("tool") or node.get("api") or ""
            activate = node.get("activate") or {}
            when = ""
            if isinstance(activate, dict) and activate.get("when"):
                when = f"when {activate.get('when')} is {activate.get('is')!r}"
            boxes[name] = Box(name, name, str(node.get("type", "python")), str(detail),
                              aggregation=bool(node.get("aggregation")), activate=when)
            deps[name] = _refs(node.get("inputs") or {})
            if isinstance(activate, dict):
                for src in _refs(activate.get("when")):
                    deps[name].add(src)
                    dashed.add((src, name))
        outs = doc.get("outputs") or {}
        names = list(outs) if isinstance(outs, dict) else []
        boxes["outputs"] = Box("outputs", "outputs", "outputs", ", ".join(map(str, names)))
        deps["outputs"] = _refs(outs)
    for name in deps:
        deps[name] = {d for d in deps[name] if d in boxes and d != name}
    _layout(graph, boxes, deps, dashed)
    return graph


def _layout(graph: Graph, boxes: dict[str, Box], deps: dict[str, set[str]],
            dashed: set[tuple[str, str]]) -> None:
    layer: dict[str, int] = {}

    def depth(name: str, seen: frozenset = frozenset()) -> int:
        if name in layer:
            return layer[name]
        if name in seen:  # a cycle: the flow's own load says so; draw it flat
            return 0
        d = 1 + max((depth(p, seen | {name}) for p in deps[name]), default=-1)
        layer[name] = d
        return d

    for name in boxes:
        depth(name)
    last = max(layer.values(), default=0)
    layer["outputs"] = max(layer.get("outputs", 0), last if len(boxes) > 2 else 1)
    rows: dict[int, list[str]] = {}
    for name in boxes:
        rows.setdefault(layer[name], []).append(name)
    widest = max(len(r) for r in rows.values())
    graph.width = PAD * 2 + widest * BOX_W + (widest - 1) * GAP_X
    for lvl, names in sorted(rows.items()):
        row_w = len(names) * BOX_W + (len(names) - 1) * GAP_X
        x0 = (graph.width - row_w) // 2
        for i, name in enumerate(names):
            box = boxes[name]
            box.layer, box.x, box.y = lvl, x0 + i * (BOX_W + GAP_X), PAD + lvl * (BOX_H + GAP_Y)
    graph.height = PAD * 2 + (max(rows) + 1) * BOX_H + max(rows) * GAP_Y
    graph.boxes = list(boxes.values())
    for dst, srcs in deps.items():
        for src in sorted(srcs):
            a, b = boxes[src], boxes[dst]
            x1, y1, x2, y2 = a.x + BOX_W // 2, a.y + BOX_H, b.x + BOX_W // 2, b.y
            mid = (y1 + y2) // 2
            graph.edges.append(Edge(src, dst, (src, dst) in dashed,
                                    f"M{x1},{y1} C{x1},{mid} {x2},{mid} {x2},{y2}"))

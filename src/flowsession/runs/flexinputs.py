"""A flow's inputs, for the column mapping: a dag flow declares them; a flex flow declares
them or takes them from its entry's signature (read with ``ast``: the flow's code is never
imported by the control plane)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

from flowsession.flows.flowfile import FlowDefinition
from flowsession.runs.mapping import NO_DEFAULT, FlowInputSpec


def flow_inputs(flow: FlowDefinition) -> list[FlowInputSpec]:
    if flow.inputs or flow.kind == "dag":
        return [FlowInputSpec(name, _default(spec)) for name, spec in flow.inputs.items()]
    return _entry_inputs(flow.folder, flow.entry or "")


def _default(spec: Any) -> Any:
    if isinstance(spec, dict) and "default" in spec:
        return spec["default"]
    return NO_DEFAULT


def _entry_inputs(folder: Path, entry: str) -> list[FlowInputSpec]:
    """``module:function`` or ``module:Class`` (its ``__call__``): the parameters, their
    defaults (literal ones) included. Unreadable entries give no inputs: the data's columns are
    then mapped by name and the executor says what is missing."""
    module, _, name = entry.partition(":")
    path = folder / (module.replace(".", "/") + ".py")
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError, ValueError):
        return []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return _params(node, skip_self=False)
        if isinstance(node, ast.ClassDef) and node.name == name:
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                        and item.name == "__call__":
                    return _params(item, skip_self=True)
    return []


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef, *, skip_self: bool) -> list[FlowInputSpec]:
    args = [*fn.args.posonlyargs, *fn.args.args]
    if skip_self and args:
        args = args[1:]
    defaults: list[Any] = [NO_DEFAULT] * (len(args) - len(fn.args.defaults))
    for d in fn.args.defaults:
        defaults.append(_literal(d))
    out = [FlowInputSpec(a.arg, d) for a, d in zip(args, defaults)]
    for a, d in zip(fn.args.kwonlyargs, fn.args.kw_defaults):
        out.append(FlowInputSpec(a.arg, NO_DEFAULT if d is None else _literal(d)))
    return out


def _literal(node: ast.expr) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        return None  # a default we cannot read: the input is optional all the same

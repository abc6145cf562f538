"""A flow's inputs, for the column mapping: a dag flow declares them; a flex flow declares
them or takes them from its entry's signature (read with ``ast``: the flow's code is never
imported by the control plane)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

from flowsession.errors import InvalidInput
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


def check_mapping_keys(flow: FlowDefinition, inputs: list[FlowInputSpec],
                       mapping: dict[str, Any] | None) -> None:
    """A mapping key the flow has no input for is a typo, said with the flow's inputs. A flex
    entry that takes ``**kwargs`` (or one that cannot be read) takes any key."""
    if not mapping or _takes_any(flow):
        return
    names = [spec.name for spec in inputs]
    unknown = [key for key in mapping if key not in names]
    if unknown:
        listed = ", ".join(names) if names else "none"
        raise InvalidInput(
            f"column mapping {', '.join(repr(k) for k in unknown)}: flow {flow.folder.name} has "
            f"no input of that name (its inputs: {listed})",
            hint="map only the flow's inputs, e.g. --column-mapping "
                 f"{names[0] if names else 'NAME'}='${{data.COLUMN}}'",
            details={"keys": unknown, "inputs": names})


def _takes_any(flow: FlowDefinition) -> bool:
    if flow.kind == "dag" or flow.inputs:
        return False
    module, _, name = (flow.entry or "").partition(":")
    try:
        tree = ast.parse((flow.folder / (module.replace(".", "/") + ".py")).read_text())
    except (OSError, SyntaxError, ValueError):
        return True
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return node.args.kwarg is not None
        if isinstance(node, ast.ClassDef) and node.name == name:
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                        and item.name == "__call__":
                    return item.args.kwarg is not None
    return True

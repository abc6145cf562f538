"""The connections a flow refers to, read from its YAML (the control plane never imports the
flow's code)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flowsession.flows.flowfile import FlowDefinition


def required_connections(flow: FlowDefinition,
                         node_override: Mapping[str, str] | None = None) -> set[str]:
    """The connections the flow certainly needs: the overrides' ``node.connection`` and the
    ``connection`` of every other node that names one."""
    node_override = node_override or {}
    names = {v for k, v in node_override.items() if k.endswith(".connection") and v}
    overridden = {k.rsplit(".", 1)[0] for k in node_override if k.endswith(".connection")}
    for node in flow.nodes:
        if isinstance(node.get("connection"), str) and node.get("name") not in overridden:
            names.add(node["connection"])
    return names


def connection_candidates(flow: FlowDefinition, node_override: Mapping[str, str] | None = None,
                          init: Mapping[str, Any] | None = None) -> set[str]:
    """Every name the flow might use as a connection: llm nodes' ``connection``, string
    inputs of nodes (a tool's connection parameter is given by name), variants' nodes,
    overrides, a flex flow's init arguments. Intersect with the connections that exist."""
    names: set[str] = set()
    nodes = list(flow.nodes)
    for variants in (flow.raw.get("node_variants") or {}).values():
        for v in (variants.get("variants") or {}).values():
            nodes.append(v.get("node") or {})
    for node in nodes:
        if isinstance(node.get("connection"), str):
            names.add(node["connection"])
        for value in (node.get("inputs") or {}).values():
            if isinstance(value, str) and not value.startswith("${"):
                names.add(value)
    names.update(v for v in (node_override or {}).values() if isinstance(v, str))
    names.update(v for v in (init or {}).values() if isinstance(v, str))
    return names

"""Preparing a run: everything a run is checked for and resolved into before it is stored, so a
run that cannot go fails at once, naming the field, and leaves nothing behind.

``prepare`` does it in order: a resumed run's settings under the new ones (``--resume-from``);
the flow (it declares inputs; the variant and the per-node connection overrides name what it
has; the connections it certainly uses exist); the run's name; its lines (the data loaded, the
base run's results, the column mapping resolved into one inputs object per line); the spec as
stored. Read back with ``spec_of``; ``start_options`` and ``variant_copy`` say what the spec
asks of the flow's session when the run is submitted.
"""

from __future__ import annotations

import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from flowsession.computes.service import ComputeKind
from flowsession.errors import Conflict, InvalidInput, NotFound
from flowsession.flows.flowfile import FlowDefinition, load_flow
from flowsession.flows.references import connection_candidates, required_connections
from flowsession.runs.data import load_data
from flowsession.runs.flexinputs import check_mapping_keys, flow_inputs
from flowsession.runs.mapping import BaseRun, resolve_inputs
from flowsession.runs.records import ENDED, Run, RunStatus
from flowsession.runs.spec import RunSpec, check_name
from flowsession.sessions.options import StartOptions

if TYPE_CHECKING:
    from flowsession.runs.service import RunService


@dataclass(frozen=True)
class PreparedRun:
    """A run checked and resolved, not stored yet."""

    spec: RunSpec  # with a resumed run's settings under it
    flow: FlowDefinition
    name: str
    lines: dict[int, dict[str, Any]]  # position -> inputs (empty for a resumed run)
    stored: dict[str, Any]  # the spec as the run's record keeps it
    resumed: Run | None  # the run it resumes


def prepare(svc: RunService, spec: RunSpec, *, user: str,
            skipped: tuple[list[str], int] | None = None) -> PreparedRun:
    """Check everything about ``spec`` and resolve its lines, storing nothing (``skipped``:
    the lines a client left out of its data, for the summary)."""
    resumed: Run | None = None
    if spec.resume_from:
        resumed = svc.records.get(spec.resume_from, owner=user)
        if resumed.status not in ENDED:
            raise Conflict(f"run {resumed.name} is {resumed.status}: only an ended run can "
                           "be resumed", hint=f"wait for it, or cancel it: flowsession run "
                           f"cancel {resumed.name}", details={"run": resumed.name})
        if not svc.files(resumed.name).has_inputs():
            raise Conflict(f"run {resumed.name} has no lines to resume: it failed before "
                           "its inputs were stored", hint="create the run again from its "
                           "flow and data", details={"run": resumed.name})
        spec = _merge(spec, resumed)
    if not spec.flow:
        raise InvalidInput("a run needs a flow", hint="give --flow FOLDER (or flow: in "
                           "run.yml)", details={"field": "flow"})
    flow = load_flow(spec.flow)
    if flow.kind == "dag" and not flow.inputs:  # as pf refuses it in batch mode
        raise InvalidInput(f"the flow {flow.folder.name} declares no inputs: a batch run "
                           "gives each line's data to the flow's inputs",
                           hint="declare inputs: in flow.dag.yaml, or run one line with "
                                "flowsession flow test", details={"field": "inputs"})
    variant = _check_variant(flow, spec)
    overrides = node_override(flow, spec)
    # the connections the flow certainly uses must exist; other names are candidates
    usable = svc.connections.usable_names(user, identity=spec.identity)
    svc.connections.for_executor_as(
        required_connections(flow, overrides)
        | (connection_candidates(flow, overrides, spec.init) & usable),
        owner=user, identity=spec.identity)
    name = check_name(spec.name) if spec.name else _generated_name(flow)
    lines: dict[int, dict[str, Any]] = {}
    data = None
    if resumed is None:
        data = load_data(spec.data, skip_malformed=spec.skip_malformed) if spec.data else None
        base = _base_run(svc, spec.run, user) if spec.run else None
        inputs = flow_inputs(flow)
        check_mapping_keys(flow, inputs, spec.column_mapping)
        lines = resolve_inputs(inputs, spec.column_mapping, data, base)
    stored = {k: v for k, v in spec.model_dump().items() if k != "environment_variables"}
    stored["environment_variables"] = sorted(spec.environment_variables)
    stored["variant_node"] = variant
    if data is not None and data.skipped:  # --skip-malformed: which lines, for the summary
        skipped = data.skipped_lines(), len(data.skipped)
    if skipped and spec.skip_malformed:  # (or the lines a client left out of data_lines)
        stored["skipped_lines"], stored["skipped_count"] = skipped
    return PreparedRun(spec=spec, flow=flow, name=name, lines=lines, stored=stored,
                       resumed=resumed)


def _base_run(svc: RunService, name: str, user: str) -> BaseRun:
    try:
        base = svc.records.get(name, owner=user)
    except NotFound:
        raise NotFound(f"base run {name!r} does not exist",
                       hint="give the name of one of your runs (flowsession run list)",
                       details={"run": name}) from None
    if base.status != RunStatus.COMPLETED:
        raise Conflict(f"base run {name!r} is {base.status}, not Completed",
                       hint="wait for it to complete, or pick a completed run",
                       details={"run": name, "status": base.status})
    files = svc.files(name)
    inputs = {files.line_number(p): row for p, row in enumerate(files.iter_inputs())}
    outputs = {row.pop("line_number"): row for row in files.outputs()}
    out_cols = list(dict.fromkeys(k for row in outputs.values() for k in row))
    in_cols = list(dict.fromkeys(k for row in inputs.values() for k in row))
    return BaseRun(name=name, inputs=inputs, outputs=outputs, output_columns=out_cols,
                   input_columns=in_cols)


def _generated_name(flow: FlowDefinition) -> str:
    stamp = time.strftime("%Y%m%d_%H%M%S")
    base = "".join(c if c.isalnum() or c in "_-" else "_" for c in flow.folder.name)
    return f"{base}_{stamp}_{uuid.uuid4().hex[:6]}"


def spec_of(run: Run) -> RunSpec:
    """The stored spec (environment variables are kept apart, encrypted)."""
    fields = RunSpec.model_fields
    return RunSpec.model_validate({k: v for k, v in run.spec.items()
                                   if k in fields and k != "environment_variables"})


def _merge(spec: RunSpec, old: Run) -> RunSpec:
    """``--resume-from``: the old run's settings, with what this submission sets on top."""
    base = {k: v for k, v in spec_of(old).model_dump(exclude_defaults=True).items()
            if k not in ("name", "resume_from", "display_name")}
    given = spec.model_dump(exclude_unset=True)
    merged = {**base, **given, "resume_from": old.name}
    merged.setdefault("flow", old.flow)
    return RunSpec.model_validate(merged).model_copy(
        update={"environment_variables": spec.environment_variables})


def start_options(spec: RunSpec) -> StartOptions:
    """The session the run's ``resources`` (and identity) ask for."""
    res = spec.resources or {}
    if res.get("compute"):
        # an identity other than the user's is refused there (an instance has its own), never
        # silently dropped: the run would run as someone else than asked
        return StartOptions(compute_type=ComputeKind.INSTANCE, instance=str(res["compute"]),
                            identity=None if spec.identity in (None, "user") else spec.identity)
    return StartOptions(vm_size=res.get("instance_type") or None, identity=spec.identity)


def _check_variant(flow: FlowDefinition, spec: RunSpec) -> str | None:
    parts = spec.variant_parts()
    if parts is None:
        return None
    node, variant = parts
    variants = (flow.raw.get("node_variants") or {}).get(node)
    if not variants:
        with_variants = sorted((flow.raw.get("node_variants") or {}))
        raise InvalidInput(f"variant {spec.variant}: node {node!r} of {flow.file} has no "
                           "variants", hint=("nodes with variants: " + ", ".join(with_variants))
                           if with_variants else "this flow defines no node_variants",
                           details={"field": "variant", "node": node})
    known = sorted((variants.get("variants") or {}))
    if variant not in known:
        raise InvalidInput(f"variant {spec.variant}: node {node!r} has no variant {variant!r}",
                           hint=f"its variants: {', '.join(known)}",
                           details={"field": "variant", "node": node})
    return f"{node}.{variant}"


def variant_copy(flow: FlowDefinition, variant: str, target: Path) -> Path:
    """The flow with ``node.variant`` made the default variant of its node."""
    node, name = variant.split(".", 1)
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(flow.folder, target, symlinks=False)
    data = yaml.safe_load(flow.file.read_text())
    data["node_variants"][node]["default_variant_id"] = name
    (target / flow.file.name).write_text(yaml.safe_dump(data, sort_keys=False))
    return target


def node_override(flow: FlowDefinition, spec: RunSpec) -> dict[str, str]:
    """``connections: {node: {connection: NAME, deployment_name: x}}`` -> promptflow's node
    overrides (``node.connection``), each node checked to exist."""
    names = {n.get("name") for n in flow.nodes}
    out = {}
    for node, fields in spec.connections.items():
        if node not in names:
            raise InvalidInput(f"connections: {flow.file} has no node {node!r}",
                               hint=f"its nodes: {', '.join(sorted(n for n in names if n))}",
                               details={"field": "connections", "node": node})
        for key, value in fields.items():
            out[f"{node}.{key}"] = value
    return out

"""Column mapping: which value each flow input gets on each line of a batch run.

Prompt flow semantics. A mapping value that is, after stripping, exactly ``${data.COL}``,
``${run.outputs.COL}`` or ``${run.inputs.COL}`` is a reference to a column of the data, of
the base run's outputs, or of the inputs the base run's lines ran with; any other value
(other strings, numbers, lists, ...) is a literal passed to every line as is. A flow input the
mapping does not name gets its default when it has one (other than None), as prompt flow's
batch runs give it ("default value is in higher priority than default mapping"), else
``${data.NAME}`` when the data has a column NAME; an input with neither is an error.

Lines are joined by line number: with a base run referenced, only lines whose base line
completed (has outputs) are kept. Everything is checked before any line is produced, and
every problem is an ``InvalidInput`` naming the mapping key, the column and the file or run.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flowsession.errors import InvalidInput
from flowsession.runs.data import DataSet

NO_DEFAULT: Any = object()  # sentinel: the flow input has no default value

_LITERAL, _DATA, _RUN_OUTPUTS, _RUN_INPUTS = "literal", "data", "run.outputs", "run.inputs"
_REFERENCE = re.compile(r"\$\{(data|run\.outputs|run\.inputs)\.([^{}]+)\}")
VALID_FORMS = "${data.<column>}, ${run.outputs.<column>} or ${run.inputs.<column>}"
_MAPPING_FORM = "--column-mapping key='${data.<column>}' (column_mapping: in a run YAML)"
_MAX_LISTED = 20


@dataclass(frozen=True)
class FlowInputSpec:
    name: str
    default: Any = NO_DEFAULT


@dataclass(frozen=True)
class BaseRun:
    """A completed earlier run, for ``${run.outputs.x}`` / ``${run.inputs.x}``."""

    name: str
    inputs: Mapping[int, Mapping[str, Any]]  # line index -> the inputs that line ran with
    outputs: Mapping[int, Mapping[str, Any]]  # line index -> outputs, only lines that completed
    output_columns: Sequence[str]
    input_columns: Sequence[str]


def parse_mapping_args(items: Sequence[str]) -> dict[str, str]:
    """``["question=${data.q}", "k=literal"]`` -> ``{"question": "${data.q}", "k": "literal"}``.

    Splits on the first ``=``; the key is stripped, the value kept as given. A key given twice
    is an error (it is almost always a typo for another key).
    """
    if isinstance(items, str):
        items = [items]
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problem = "has no '='" if not sep else "has an empty key"
            raise InvalidInput(
                f"column mapping {item!r} {problem}",
                hint="write each mapping as key='${data.column}' (or key=literal), e.g. "
                     "--column-mapping question='${data.question}'; quote the value so the "
                     "shell leaves ${...} alone",
                details={"item": item},
            )
        if key in out:
            raise InvalidInput(
                f"column mapping '{key}' is given twice ({out[key]!r} and {value!r})",
                hint="give each key once",
                details={"key": key},
            )
        out[key] = value
    return out


def resolve_inputs(flow_inputs: Sequence[FlowInputSpec], mapping: Mapping[str, Any] | None,
                   data: DataSet | None, base: BaseRun | None) -> dict[int, dict[str, Any]]:
    """Line index -> the inputs for that line, ordered by index.

    Each line's inputs hold the flow's inputs in flow order, then the mapping's extra keys.
    An input whose referenced column is missing from that one row (or base line) is left out
    of that line; an input left to its flow default is left out of every line. Literal values
    are shared between lines, not copied.
    """
    plan = _compile(flow_inputs, mapping, data, base)
    rows = data.rows if data is not None else None
    outputs = base.outputs if base is not None else None
    inputs = base.inputs if base is not None else None

    if data is not None:
        indices: Any = range(len(data.rows))
        if plan.uses_outputs:
            indices = [i for i in indices if i in outputs]  # type: ignore[operator]
        if plan.uses_inputs:
            indices = [i for i in indices if i in inputs]  # type: ignore[operator]
    else:
        assert base is not None
        if plan.uses_inputs and not plan.uses_outputs:
            indices = sorted(base.inputs)
        else:
            indices = sorted(base.outputs)
            if plan.uses_inputs:
                indices = [i for i in indices if i in base.inputs]

    steps = plan.steps
    missing = _MISSING
    result: dict[int, dict[str, Any]] = {}
    for i in indices:
        row = rows[i] if rows is not None else None
        out_line = outputs.get(i) if plan.uses_outputs else None  # type: ignore[union-attr]
        in_line = inputs.get(i) if plan.uses_inputs else None  # type: ignore[union-attr]
        line: dict[str, Any] = {}
        for key, kind, arg in steps:
            if kind is _LITERAL:
                line[key] = arg
                continue
            source = row if kind is _DATA else out_line if kind is _RUN_OUTPUTS else in_line
            value = source.get(arg, missing)  # type: ignore[union-attr]
            if value is not missing:
                line[key] = value
        result[i] = line
    return result


def describe_mapping(flow_inputs: Sequence[FlowInputSpec], mapping: Mapping[str, Any] | None,
                     data: DataSet | None, base: BaseRun | None) -> dict[str, str]:
    """The effective mapping after the default mapping, for display: key -> reference or literal.

    References are shown as ``${data.col}`` etc.; string literals as they are; other literals
    as JSON. Inputs left to their flow default are not shown. Raises the same errors as
    ``resolve_inputs``.
    """
    plan = _compile(flow_inputs, mapping, data, base)
    out: dict[str, str] = {}
    for key, kind, arg in plan.steps:
        if kind is _LITERAL:
            out[key] = arg if isinstance(arg, str) else _as_json(arg)
        else:
            out[key] = f"${{{kind}.{arg}}}"
    return out


# --- compiling --------------------------------------------------------------------------------


_MISSING: Any = object()


@dataclass(frozen=True)
class _Plan:
    steps: list[tuple[str, str, Any]]  # (input key, kind, column or literal value)
    uses_outputs: bool
    uses_inputs: bool


def _compile(flow_inputs: Sequence[FlowInputSpec], mapping: Mapping[str, Any] | None,
             data: DataSet | None, base: BaseRun | None) -> _Plan:
    if data is None and base is None:
        raise InvalidInput(
            "a run needs data or a base run",
            hint="give data (--data FILE, or data: in a run YAML) and/or a base run to "
                 "evaluate (--run NAME, or run:)",
        )
    mapping = mapping or {}
    data_columns = set(data.columns) if data is not None else set()
    parsed: dict[str, tuple[str, Any]] = {}
    for key, value in mapping.items():
        if not isinstance(key, str) or not key.strip():
            raise InvalidInput(
                f"column mapping has an invalid key {key!r}",
                hint="mapping keys are flow input names, e.g. " + _MAPPING_FORM,
                details={"key": str(key)},
            )
        kind, arg = _classify(key, value)
        if kind is not _LITERAL:
            _check_reference(key, value, kind, arg, data, data_columns, base)
        parsed[key] = (kind, arg)

    steps: list[tuple[str, str, Any]] = []
    unmapped: list[str] = []
    names: set[str] = set()
    for spec in flow_inputs:
        if spec.name in names:
            continue
        names.add(spec.name)
        if spec.name in parsed:
            steps.append((spec.name, *parsed[spec.name]))
        elif spec.name in data_columns and (spec.default is NO_DEFAULT or spec.default is None):
            steps.append((spec.name, _DATA, spec.name))
        elif spec.default is NO_DEFAULT:
            unmapped.append(spec.name)
    if unmapped:
        raise _no_value(unmapped, data, base)
    steps.extend((key, kind, arg) for key, (kind, arg) in parsed.items() if key not in names)
    kinds = {kind for _, kind, _ in steps}
    return _Plan(steps=steps, uses_outputs=_RUN_OUTPUTS in kinds,
                 uses_inputs=_RUN_INPUTS in kinds)


def _classify(key: str, value: Any) -> tuple[str, Any]:
    """(kind, column) for a reference, (_LITERAL, value) for anything else."""
    if not isinstance(value, str):
        return _LITERAL, value
    text = value.strip()
    if not text.startswith("${"):
        return _LITERAL, value
    match = _REFERENCE.fullmatch(text)
    if match:
        source, column = match.groups()
        kind = {"data": _DATA, "run.outputs": _RUN_OUTPUTS, "run.inputs": _RUN_INPUTS}[source]
        return kind, column
    # The whole value is one ${...} (or an unclosed "${...") that is not a valid reference:
    # a typo, not a literal. Strings that merely contain ${...} among other text are literals.
    single = text.endswith("}") and text.count("${") == 1 and text.count("}") == 1
    if single or "}" not in text:
        raise InvalidInput(
            f"column mapping '{key}' has an invalid reference {value!r}",
            hint=f"a reference must be exactly {VALID_FORMS}; "
                 f"e.g. --column-mapping {key}='${{data.{key}}}'",
            details={"key": key, "value": value},
        )
    return _LITERAL, value


def _check_reference(key: str, value: str, kind: str, column: str, data: DataSet | None,
                     data_columns: set[str], base: BaseRun | None) -> None:
    if kind is _DATA:
        if data is None:
            raise InvalidInput(
                f"column mapping '{key}' refers to {value.strip()} but no data was given",
                hint="give data (--data FILE, or data: in a run YAML), or map the input to "
                     "${run.outputs.<column>} / ${run.inputs.<column>} of the base run",
                details={"key": key, "value": value, "column": column},
            )
        if column not in data_columns:
            raise InvalidInput(
                f"column mapping '{key}' refers to column '{column}', which data file "
                f"{data.path} does not have",
                hint=f"the data's columns: {_listing(data.columns)}",
                details={"key": key, "value": value, "column": column, "file": str(data.path)},
            )
        return
    which = "output" if kind is _RUN_OUTPUTS else "input"
    if base is None:
        raise InvalidInput(
            f"column mapping '{key}' refers to {value.strip()} but no base run was given",
            hint="name the run whose lines to use with --run NAME (or run: in a run YAML)",
            details={"key": key, "value": value, "column": column},
        )
    columns = base.output_columns if kind is _RUN_OUTPUTS else base.input_columns
    if column not in columns:
        raise InvalidInput(
            f"column mapping '{key}' refers to {which} column '{column}', which base run "
            f"'{base.name}' does not have",
            hint=f"run '{base.name}' has {which}s: {_listing(columns)}",
            details={"key": key, "value": value, "column": column, "run": base.name},
        )


def _no_value(names: list[str], data: DataSet | None, base: BaseRun | None) -> InvalidInput:
    if len(names) == 1:
        subject, verb = f"flow input '{names[0]}'", "has"
        columns, them = f"no column '{names[0]}'", "it"
    else:
        subject, verb = f"flow inputs {_listing(names)}", "have"
        columns, them = "no columns of those names", "them"
    if data is not None:
        why = f"the data has {columns} and no column mapping names {them}"
    else:
        why = f"no data was given and no column mapping names {them}"
    sources = []
    if data is not None:
        sources.append(f"the data's columns: {_listing(data.columns)}")
    if base is not None:
        sources.append(f"run '{base.name}' has outputs: {_listing(base.output_columns)} "
                       f"and inputs: {_listing(base.input_columns)}")
    example = "data.<column>" if data is not None else "run.outputs.<column>"
    return InvalidInput(
        f"{subject} {verb} no value: {why}",
        hint="; ".join([(f"map {them} with --column-mapping {names[0]}='${{{example}}}' "
                         "(column_mapping: in a run YAML), or give the flow input a default"),
                        *sources]),
        details={"input": names[0], "inputs": names,
                 **({"file": str(data.path)} if data is not None else {})},
    )


def _listing(names: Sequence[str]) -> str:
    if not names:
        return "(none)"
    shown = ", ".join(f"'{n}'" for n in list(names)[:_MAX_LISTED])
    if len(names) > _MAX_LISTED:
        shown += f", ... ({len(names) - _MAX_LISTED} more)"
    return shown


def _as_json(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)

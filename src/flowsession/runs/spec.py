"""What a run asks for: prompt flow's Run schema (``run.yml``), CLI flags or SDK arguments,
checked into one ``RunSpec``. Paths in a run.yml are relative to the file's folder."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from flowsession.errors import InvalidInput
from flowsession.runs.model import DEFAULT_CONCURRENCY
from flowsession.worker.protocol import MAX_CONCURRENCY

# prompt flow's Run schema, plus flowsession's own knobs
RUN_YAML_FIELDS = frozenset({
    "$schema", "flow", "data", "column_mapping", "run", "variant", "environment_variables",
    "connections", "init", "resources", "identity", "runtime", "name", "display_name",
    "description", "tags", "workers", "line_timeout", "skip_malformed", "resume_from",
    "max_concurrency",
})
RESOURCE_KEYS = ("instance_type", "compute", "max_concurrency")
_VARIANT = re.compile(r"^\$\{([A-Za-z_][\w-]*)\.([A-Za-z_][\w-]*)\}$")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}$")


class RunSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    flow: str | None = None  # a folder (None only with resume_from)
    data: str | None = None
    column_mapping: dict[str, Any] = Field(default_factory=dict)
    run: str | None = None  # the base run's name
    variant: str | None = None  # ${node.variant_id}
    environment_variables: dict[str, str] = Field(default_factory=dict)
    connections: dict[str, dict[str, str]] = Field(default_factory=dict)  # node -> overrides
    init: dict[str, Any] = Field(default_factory=dict)  # a flex flow class's __init__ kwargs
    resources: dict[str, Any] = Field(default_factory=dict)
    identity: str | None = None
    runtime: str | None = None
    name: str | None = None
    display_name: str | None = None
    description: str = ""
    tags: dict[str, str] = Field(default_factory=dict)
    workers: int | None = Field(default=None, ge=1, le=256)
    max_concurrency: int | None = Field(default=None, ge=1, le=MAX_CONCURRENCY,
                                        description="lines in flight (default "
                                        f"{DEFAULT_CONCURRENCY}; PF_WORKER_COUNT also sets it)")
    line_timeout: float | None = Field(default=None, ge=0)
    skip_malformed: bool = False
    resume_from: str | None = None

    @field_validator("environment_variables", "tags", mode="before")
    @classmethod
    def _strings(cls, v: Any) -> Any:
        if isinstance(v, Mapping):
            return {str(k): "" if x is None else str(x) for k, x in v.items()}
        return v

    @model_validator(mode="before")
    @classmethod
    def _concurrency_from_resources(cls, data: Any) -> Any:
        """``resources: {max_concurrency: N}`` is the same setting as ``max_concurrency``."""
        if isinstance(data, Mapping) and isinstance(data.get("resources"), Mapping) \
                and "max_concurrency" in data["resources"]:
            resources = dict(data["resources"])
            value = resources.pop("max_concurrency")
            data = {**data, "resources": resources}
            if data.get("max_concurrency") is None:
                data["max_concurrency"] = value
        return data

    @field_validator("environment_variables")
    @classmethod
    def _worker_count(cls, v: dict[str, str]) -> dict[str, str]:
        """``PF_WORKER_COUNT`` (prompt flow's lines in flight) must be a sensible count."""
        if "PF_WORKER_COUNT" in v:
            text = v["PF_WORKER_COUNT"].strip()
            if not text.isdigit() or not 1 <= int(text) <= MAX_CONCURRENCY:
                raise ValueError(f"PF_WORKER_COUNT={v['PF_WORKER_COUNT']!r}: it must be a "
                                 f"whole number from 1 to {MAX_CONCURRENCY} (lines in flight)")
        return v

    def concurrency(self, env: Mapping[str, str] | None = None) -> int:
        """The run's lines in flight: ``max_concurrency``, else ``PF_WORKER_COUNT`` of its
        environment variables (``env``: those kept apart), else the default."""
        if self.max_concurrency:
            return self.max_concurrency
        count = (env if env is not None else self.environment_variables).get("PF_WORKER_COUNT")
        if count and count.strip().isdigit() and 1 <= int(count) <= MAX_CONCURRENCY:
            return int(count)
        return DEFAULT_CONCURRENCY

    @field_validator("identity", mode="before")
    @classmethod
    def _identity(cls, v: Any) -> Any:
        """prompt flow writes ``identity: {type: user_identity}`` or
        ``{type: managed, client_id: ...}``; flowsession names managed identities."""
        if isinstance(v, Mapping):
            kind = str(v.get("type", "")).lower()
            if kind in ("user_identity", "user", ""):
                return None
            return str(v.get("name") or v.get("client_id") or v.get("resource_id") or kind)
        return v

    def variant_parts(self) -> tuple[str, str] | None:
        if not self.variant:
            return None
        m = _VARIANT.match(self.variant.strip())
        if not m:
            raise InvalidInput(f"variant {self.variant!r} is not of the form ${{node.variant}}",
                               hint="write it as '${NODE_NAME.VARIANT_ID}', e.g. "
                                    "'${summarize.variant_1}'", details={"field": "variant"})
        return m.group(1), m.group(2)


def spec_from_dict(data: Mapping[str, Any], *, source: str = "the run",
                   base_dir: Path | None = None) -> tuple[RunSpec, list[str]]:
    """A RunSpec and warnings (fields it does not use, named). Relative ``flow`` and ``data``
    paths are taken from ``base_dir``."""
    warnings = []
    unknown = sorted(k for k in data if k not in RUN_YAML_FIELDS)
    if unknown:
        warnings.append(f"{source}: ignoring unknown field(s) {', '.join(unknown)}")
    clean = {k: v for k, v in data.items() if k in RUN_YAML_FIELDS and k != "$schema"}
    runtime = clean.get("runtime")
    if runtime not in (None, "", "automatic"):
        warnings.append(f"{source}: runtime {runtime!r} is not used: a run goes to its flow's "
                        "compute session (set resources: to choose the compute)")
    resources = clean.get("resources") or {}
    if isinstance(resources, Mapping):
        extra = sorted(k for k in resources if k not in RESOURCE_KEYS)
        if extra:
            warnings.append(f"{source}: ignoring resources field(s) {', '.join(extra)} "
                            f"(used: {', '.join(RESOURCE_KEYS)})")
    try:
        spec = RunSpec.model_validate(clean)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidInput(f"{source}: field '{where}': {first['msg']}",
                           hint="fix the field (prompt flow's Run schema)",
                           details={"field": where}) from None
    if base_dir is not None:
        updates = {}
        for key in ("flow", "data"):
            value = getattr(spec, key)
            if value and not Path(value).expanduser().is_absolute():
                updates[key] = str((base_dir / value).resolve())
        spec = spec.model_copy(update=updates)
    return spec, warnings


def load_run_yaml(path: str | Path) -> tuple[RunSpec, list[str]]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror or exc}",
                           hint="check the path given to --file") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise InvalidInput(f"{path}{where} is not valid YAML: {getattr(exc, 'problem', exc)}",
                           hint="fix the YAML", details={"file": str(path)}) from None
    if not isinstance(data, Mapping):
        raise InvalidInput(f"{path} is not a mapping of run fields",
                           hint="write fields like flow:, data:, column_mapping:",
                           details={"file": str(path)})
    return spec_from_dict(data, source=str(path), base_dir=path.parent.resolve())


def parse_pairs(items: list[str] | None, *, option: str) -> dict[str, str]:
    """``k=v`` CLI items (``--environment-variables``, ``--connections``)."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InvalidInput(f"{option} {item!r} is not of the form key=value",
                               hint=f"write it as {option} key=value",
                               details={"option": option})
        out[key.strip()] = value
    return out


def connection_overrides(pairs: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """``node.connection=NAME`` / ``node.deployment_name=x`` -> {node: {connection: NAME}}."""
    out: dict[str, dict[str, str]] = {}
    for key, value in pairs.items():
        node, dot, field = key.partition(".")
        if not dot or not node or not field:
            raise InvalidInput(f"--connections {key}={value}: the key must be NODE.FIELD",
                               hint="e.g. --connections summarize.connection=my_openai",
                               details={"option": "--connections"})
        out.setdefault(node, {})[field] = value
    return out


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise InvalidInput(f"run name {name!r} is not valid",
                           hint="use letters, digits, '_', '-' and '.', at most 200 characters",
                           details={"field": "name"})
    return name

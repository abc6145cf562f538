"""What every compute backend provides (local processes today, Ray next).

Handles are frozen, JSON-serialisable records stored in the database: a fresh control plane
resumes from them after a restart (reattach, or mark lost — never guess).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, Protocol

from flowsession.backends.compute.boundary import Collected


@dataclass(frozen=True)
class VmSize:
    name: str
    vcpu: float
    memory_bytes: int
    description: str = ""


@dataclass(frozen=True)
class ComputeSpec:
    id: str
    kind: str  # "serverless" | "instance"
    owner: str
    size: VmSize


@dataclass(frozen=True)
class ComputeHandle:
    backend: str
    compute_id: str
    limits: Mapping[str, Any]  # what enforces the size: {"mode": "cgroup1"|"cgroup2"|"rlimit", ...}
    vcpu: float
    memory_bytes: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ComputeHandle:
        return cls(**data)


@dataclass(frozen=True)
class ImageDef:
    """One image of a chain as a node needs it to build (or adopt) it: what its content
    follows from, never where the control plane keeps it."""

    name: str
    version: int
    builtin: bool
    parent: str | None
    layer_lock: str
    requirements: str = ""
    description: str = ""

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


@dataclass(frozen=True)
class EnvRecipe:
    """How to build an environment where its session runs, for a backend whose sessions do
    not share the control plane's disk (Ray): the image chain (the image first, its parents
    after), the resolved lock, the requirements' feeds, the index; the feeds' secrets travel
    only in memory (``repr`` hides them) and never reach a file or an argument."""

    image: str  # the image's ref
    images: tuple[ImageDef, ...]
    lock: str = ""  # what the environment adds to the image ("" for the image alone)
    requirements: Any = None  # the FlowRequirements the lock came from (its feeds), or None
    index_url: str | None = None
    credentials: Mapping[str, str] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class EnvHandle:
    """An environment as a session needs it: the image's interpreter and the layer to add
    (paths of the control plane's machine), and, for backends that build where the session
    runs, the recipe to build it there."""

    env_id: str
    python: str  # the image venv's python (the supervisor's interpreter)
    image_ref: str
    site_dirs: tuple[str, ...]  # the environment's own site-packages (added at adoption)
    read_only_paths: tuple[str, ...]  # everything the interpreter needs to see, read-only
    recipe: EnvRecipe | None = None


@dataclass(frozen=True)
class SessionSpec:
    session_id: str
    flow_dir: str  # the snapshot
    idle_timeout_s: float
    workers: int = 1
    env_vars: Mapping[str, str] = field(default_factory=dict)
    # the flow's connections (promptflow's dict form, secrets included): handed to the
    # supervisor in memory, never stored (``repr`` hides them)
    connections: Mapping[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class RunWork:
    """A batch run as a session gets it: the lines travel as data (never as a path)."""

    run_id: str
    inputs: bytes  # one JSON object of inputs per line; a line's position is its index
    lines: tuple[int, ...] | None  # the positions to run (None: every line)
    workers: int
    line_timeout: float
    flow: str | None = None  # a snapshot of the control plane's (a variant): None, the session's
    env: Mapping[str, str] = field(default_factory=dict, repr=False)
    connections: Mapping[str, Any] = field(default_factory=dict, repr=False)
    init: Mapping[str, Any] = field(default_factory=dict)
    node_override: Mapping[str, str] = field(default_factory=dict)
    concurrency: int | None = None  # lines in flight (None: one per worker)


@dataclass(frozen=True)
class SessionHandle:
    """A running session as the control plane stores it. ``slot`` is the backend's key of
    the session's instance (the local backend: its folder; Ray: its actor's name); ``ref``
    holds what only the backend reads (the local backend: ``pid``, ``pid_start`` -- the
    /proc start time, so a reused pid is not taken for ours -- and ``socket``; Ray: the
    actor's namespace, its node and the supervisor's pid there)."""

    backend: str
    session_id: str
    slot: str
    sandboxed: bool
    sandbox_detail: str
    limits_detail: str
    from_standby: bool = False
    ref: Mapping[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int | None:
        """The supervisor's pid (on its own machine), when the backend knows it."""
        pid = self.ref.get("pid")
        return pid if type(pid) is int else None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ref": dict(self.ref)}

    def json_text(self) -> str:
        return json.dumps(self.to_json())

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SessionHandle:
        data = dict(data)
        ref = dict(data.pop("ref", None) or {})
        for key in ("pid", "pid_start", "socket"):  # handles stored before ``ref`` existed
            if key in data:
                ref[key] = data.pop(key)
        return cls(**data, ref=ref)


class BackendState(StrEnum):
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    EXITED = "EXITED"
    LOST = "LOST"


@dataclass(frozen=True)
class BackendStatus:
    state: BackendState
    detail: str = ""  # why: "idle for 600 s", "worker 123 killed by SIGKILL", ...
    busy: int = 0  # lines executing now
    idle_seconds: float = 0.0
    failed: bool = False  # running, but unusable: reset recovers
    note: str = ""  # running on, but something happened to tell: "worker 12 was killed ..."


class ComputeBackend(Protocol):
    name: ClassVar[str]
    # True: environments are built where the sessions run (from ``EnvHandle.recipe``), and
    # the control plane only resolves them; False: the control plane builds them itself
    builds_environments: ClassVar[bool]

    async def provision(self, compute: ComputeSpec) -> ComputeHandle: ...

    async def release(self, handle: ComputeHandle) -> None: ...

    async def start_standby(self, env: EnvHandle, *, idle_timeout_s: float,
                            compute: ComputeHandle | None = None) -> SessionHandle:
        """A supervisor with the runtime imported, waiting to be adopted: on no compute yet
        (the standby pool's), or where ``compute`` runs its sessions (a start's own; a backend
        whose sessions all share one machine may ignore it)."""
        ...

    async def start_session(self, compute: ComputeHandle, env: EnvHandle, spec: SessionSpec,
                            *, standby: SessionHandle | None = None) -> SessionHandle:
        """Run ``spec`` on ``compute``: adopt ``standby`` (started with ``env``'s image) or
        start a supervisor; returns once the flow is loaded in its workers."""
        ...

    async def stop_session(self, handle: SessionHandle, *, reason: str = "") -> None: ...

    async def status(self, handle: SessionHandle) -> BackendStatus: ...

    async def test_line(self, handle: SessionHandle, inputs: Mapping[str, Any], *,
                        timeout: float, connections: Mapping[str, Any] | None = None,
                        init: Mapping[str, Any] | None = None, with_trace: bool = False
                        ) -> dict[str, Any]:
        """One line; ``connections``/``init`` (when given) are what the flow loads with;
        ``with_trace``: ``{"outputs", "trace", "duration"}``."""
        ...

    async def reload(self, handle: SessionHandle, snapshot: Path) -> None:
        """Serve a changed flow (a new snapshot) with fresh workers."""
        ...

    async def configure(self, handle: SessionHandle, *, idle_timeout_s: float) -> None: ...

    async def logs(self, handle: SessionHandle, *, tail_bytes: int = 256 * 1024) -> str:
        """The end of the session's log (supervisor and workers), as text; kept for a while
        after the session ends."""
        ...

    async def ended_log(self, session_id: str, *, tail_bytes: int = 256 * 1024) -> str:
        """What was kept of the log of session ``session_id`` after it ended and its handle
        was dropped (``session logs`` of a stopped session); empty when nothing was kept."""
        ...

    def alive(self, handle: SessionHandle) -> bool:
        """Does the session still run (cheap: no request to it)?"""
        ...

    # --- batch runs. The session runs the lines; what crosses back is data, validated and
    # bounded by the backend (``boundary``): the control plane never reads a session's files.

    async def submit_run(self, handle: SessionHandle, work: RunWork) -> dict[str, Any]:
        """Start (or re-attach to) a run; returns its progress (``boundary.run_progress``)."""
        ...

    async def run_status(self, handle: SessionHandle, run_id: str) -> dict[str, Any] | None:
        """The session's view of the run, or None when it does not know it (or has ended)."""
        ...

    async def collect(self, handle: SessionHandle | None, run_id: str,
                      cursor: Mapping[str, int], *, total: int) -> Collected:
        """Records (positions below ``total``) and log text past ``cursor``: from the session
        while it runs, else what was kept of the sessions that ran the run."""
        ...

    async def cancel_run(self, handle: SessionHandle, run_id: str) -> None: ...

    async def aggregate_run(self, handle: SessionHandle, work: RunWork,
                            records: bytes) -> dict[str, Any]:
        """The aggregation nodes over ``records`` (stored records, JSON lines):
        ``{"aggregated", "metrics", "error"}``."""
        ...

    async def forget_run(self, handle: SessionHandle | None, run_id: str) -> None:
        """The run is stored and ended: drop whatever the backend kept of it."""
        ...

    def orphans(self, known: set[str]) -> list[SessionHandle]:
        """Sessions this backend runs that no record refers to (``known``: the ``slot`` of
        every handle that is recorded)."""
        ...

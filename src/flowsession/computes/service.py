"""The computes service: the only writer of ``computes``.

A compute belongs to one user and hosts many sessions of that user. *Serverless* computes are
made on demand with a VM size and deleted when their last session stops. *Instances* are created
by their owner, started and stopped by hand, fixed in size; idle shutdown stops them (never
deletes them). Another user's compute is "not found", exactly like one that does not exist.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from flowsession.backends.compute.base import ComputeBackend, ComputeHandle, ComputeSpec, VmSize
from flowsession.computes import sizes
from flowsession.config import Settings
from flowsession.errors import Conflict, InvalidInput, NotFound, QuotaExceeded
from flowsession.sessions.state import ACTIVE as ACTIVE_SESSION
from flowsession.store import Store
from flowsession.store.tables import computes, sessions


class ComputeKind(StrEnum):
    SERVERLESS = "serverless"  # made with a session, deleted when its last session stops
    INSTANCE = "instance"  # made, started and stopped by its owner; idle shutdown stops it


class ComputeState(StrEnum):
    """An instance is started and stopped by hand (a serverless compute is always running,
    until it is deleted); only a running compute counts against the vCPU quota."""

    RUNNING = "RUNNING"
    STOPPED = "STOPPED"


@dataclass(frozen=True)
class Compute:
    id: str
    name: str
    owner: str
    kind: ComputeKind
    vm_size: str
    vcpu: float
    memory_bytes: int
    state: ComputeState
    idle_shutdown_s: float | None
    identity: str
    handle: str | None
    reason: str | None
    created_at: float
    last_activity_at: float

    def __post_init__(self) -> None:  # a row holds the values
        object.__setattr__(self, "kind", ComputeKind(self.kind))
        object.__setattr__(self, "state", ComputeState(self.state))

    @property
    def compute_handle(self) -> ComputeHandle | None:
        return ComputeHandle.from_json(json.loads(self.handle)) if self.handle else None

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        handle = d.pop("handle")
        d["limits"] = json.loads(handle)["limits"].get("mode") if handle else None
        return d


class ComputeService:
    def __init__(self, settings: Settings, store: Store, backend: ComputeBackend,
                 clock: Callable[[], float] = time.time):
        self.settings, self.store, self.backend, self.clock = settings, store, backend, clock

    @cached_property
    def catalog(self) -> dict[str, VmSize]:
        return sizes.load_catalog(self.settings.vm_sizes_file)

    @cached_property
    def quota(self) -> float:
        """The vCPU quota: FLOWSESSION_VCPU_QUOTA, else the backend's (local: the machine's)."""
        return sizes.quota_of(self.settings.vcpu_quota, self.settings.backend)[0]

    @cached_property
    def quota_source(self) -> str:
        return sizes.quota_of(self.settings.vcpu_quota, self.settings.backend)[1]

    # --- reading ---------------------------------------------------------------------------

    def get(self, name_or_id: str, *, user: str) -> Compute:
        q = select(computes).where((computes.c.name == name_or_id) | (computes.c.id == name_or_id))
        with self.store.engine.connect() as c:
            row = c.execute(q).first()
        if row is None or row.owner != user:  # not yours is the same as not there
            raise NotFound(f"compute '{name_or_id}' does not exist",
                           hint="list your computes with: flowsession compute list")
        return Compute(**row._mapping)

    def list(self, *, user: str | None) -> list[Compute]:
        q = select(computes).order_by(computes.c.created_at)
        if user is not None:
            q = q.where(computes.c.owner == user)
        with self.store.engine.connect() as c:
            return [Compute(**r._mapping) for r in c.execute(q)]

    def vcpu_in_use(self) -> float:
        with self.store.engine.connect() as c:
            return _vcpu_in_use(c)

    def session_counts(self) -> dict[str, int]:
        """compute id -> its active sessions (what ``session_count`` says of one)."""
        with self.store.engine.connect() as c:
            return dict(c.execute(select(sessions.c.compute_id, func.count())
                                  .where(sessions.c.state.in_(sorted(ACTIVE_SESSION)),
                                         sessions.c.compute_id.is_not(None))
                                  .group_by(sessions.c.compute_id)).all())

    def session_count(self, compute_id: str) -> int:
        with self.store.engine.connect() as c:
            return c.execute(select(func.count()).select_from(sessions).where(
                sessions.c.compute_id == compute_id,
                sessions.c.state.in_(sorted(ACTIVE_SESSION)))).scalar()

    def size(self, name: str) -> VmSize:
        return sizes.lookup(self.catalog, name)

    def smallest_size(self) -> VmSize:
        """The size of a session started implicitly (by a test line or a run)."""
        return sizes.smallest(self.catalog)

    def default_size(self, *, or_smallest: bool = False) -> VmSize:
        """The default size if it fits the quota, else the smallest that does; with
        ``or_smallest``, the smallest when none fits (a start then reclaims idle sessions)."""
        try:
            return sizes.pick_default(self.catalog, self.settings.default_vm_size,
                                      quota=self.quota, in_use=self.vcpu_in_use())
        except QuotaExceeded:
            if not or_smallest:
                raise
            return self.smallest_size()

    # --- instances ---------------------------------------------------------------------------

    async def create_instance(self, name: str, *, user: str, size: str | None = None,
                              idle_shutdown_s: float | None = None,
                              identity: str = "user") -> Compute:
        if not name or len(name) > 100 or not name.replace("-", "").replace("_", "").isalnum():
            raise InvalidInput(f"'{name}' is not a valid compute name",
                               hint="use letters, digits, '-' and '_' (at most 100)")
        vm = self.size(size) if size else self.default_size()
        return await self._create(name=name, kind=ComputeKind.INSTANCE, user=user, size=vm,
                                  identity=identity, idle_shutdown_s=idle_shutdown_s)

    async def start(self, name: str, *, user: str) -> Compute:
        compute = self.get(name, user=user)
        if compute.kind != ComputeKind.INSTANCE:
            raise Conflict(f"compute '{name}' is serverless: it starts with its sessions")
        if compute.state == ComputeState.RUNNING:
            return compute
        sizes.check_fits(self.size(compute.vm_size), quota=self.quota,
                         in_use=self.vcpu_in_use())
        handle = await self.backend.provision(self._spec(compute))
        self._set(compute.id, state=ComputeState.RUNNING, handle=json.dumps(handle.to_json()),
                  reason=None, last_activity_at=self.clock())
        return self.get(compute.id, user=user)

    async def stop(self, compute: Compute, *, reason: str) -> Compute:
        """Stop an instance (its sessions must be stopped first: the sessions service does)."""
        if compute.state == ComputeState.RUNNING and compute.compute_handle:
            await self.backend.release(compute.compute_handle)
        self._set(compute.id, state=ComputeState.STOPPED, handle=None, reason=reason)
        return self.get(compute.id, user=compute.owner)

    async def delete(self, name: str, *, user: str) -> None:
        compute = self.get(name, user=user)
        if self.session_count(compute.id):
            raise Conflict(f"compute '{name}' still hosts sessions",
                           hint="stop them first (flowsession session list), or stop the compute")
        if compute.compute_handle:
            await self.backend.release(compute.compute_handle)
        with self.store.engine.begin() as c:
            c.execute(delete(computes).where(computes.c.id == compute.id))

    def set_idle_shutdown(self, compute: Compute, seconds: float | None) -> None:
        self._set(compute.id, idle_shutdown_s=seconds)

    # --- serverless ----------------------------------------------------------------------------

    async def provision_serverless(self, *, user: str, size: VmSize, identity: str) -> Compute:
        # one name everywhere: a serverless compute's name is its id (what sessions show)
        return await self._create(name=None, kind=ComputeKind.SERVERLESS, user=user, size=size,
                                  identity=identity, idle_shutdown_s=None)

    async def release_if_unused(self, compute_id: str | None) -> bool:
        """A serverless compute with no session left is deleted."""
        if compute_id is None:
            return False
        with self.store.engine.connect() as c:
            row = c.execute(select(computes).where(computes.c.id == compute_id)).first()
        if row is None or row.kind != ComputeKind.SERVERLESS or self.session_count(compute_id):
            return False
        compute = Compute(**row._mapping)
        if compute.compute_handle:
            await self.backend.release(compute.compute_handle)
        with self.store.engine.begin() as c:
            c.execute(delete(computes).where(computes.c.id == compute_id))
        return True

    def touch(self, compute_id: str | None) -> None:
        if compute_id:
            self._set(compute_id, last_activity_at=self.clock())

    def idle_instances(self, now: float) -> list[Compute]:
        """Running instances whose idle shutdown is due (no session activity for that long)."""
        due = []
        for compute in self.list(user=None):
            if (compute.kind == ComputeKind.INSTANCE and compute.state == ComputeState.RUNNING
                    and compute.idle_shutdown_s and not self.session_count(compute.id)
                    and now - compute.last_activity_at >= compute.idle_shutdown_s):
                due.append(compute)
        return due

    # --- helpers ---------------------------------------------------------------------------

    async def _create(self, *, name: str | None, kind: ComputeKind, user: str, size: VmSize, identity: str,
                      idle_shutdown_s: float | None) -> Compute:
        compute_id = f"cmp-{uuid.uuid4().hex[:10]}"
        name = name or compute_id
        now = self.clock()
        # the quota check and the insert are one transaction: two creators cannot both fit
        with self.store.engine.begin() as c:
            sizes.check_fits(size, quota=self.quota, in_use=_vcpu_in_use(c))
            try:
                c.execute(insert(computes).values(
                    id=compute_id, name=name, owner=user, kind=kind, vm_size=size.name,
                    vcpu=size.vcpu, memory_bytes=size.memory_bytes, state=ComputeState.RUNNING,
                    idle_shutdown_s=idle_shutdown_s, identity=identity, handle=None,
                    created_at=now, last_activity_at=now))
            except IntegrityError:
                raise Conflict(f"a compute named '{name}' already exists",
                               hint="choose another name") from None
        compute = Compute(id=compute_id, name=name, owner=user, kind=kind, vm_size=size.name,
                          vcpu=size.vcpu, memory_bytes=size.memory_bytes,
                          state=ComputeState.RUNNING, idle_shutdown_s=idle_shutdown_s,
                          identity=identity, handle=None, reason=None, created_at=now,
                          last_activity_at=now)
        try:
            handle = await self.backend.provision(self._spec(compute))
        except BaseException:
            with self.store.engine.begin() as c:
                c.execute(delete(computes).where(computes.c.id == compute_id))
            raise
        self._set(compute_id, handle=json.dumps(handle.to_json()))
        return self.get(compute_id, user=user)

    def _spec(self, compute: Compute) -> ComputeSpec:
        return ComputeSpec(id=compute.id, kind=compute.kind, owner=compute.owner,
                           size=VmSize(compute.vm_size, compute.vcpu, compute.memory_bytes))

    def _set(self, compute_id: str, **values) -> None:
        with self.store.engine.begin() as c:
            c.execute(update(computes).where(computes.c.id == compute_id).values(**values))


def _vcpu_in_use(conn) -> float:
    """vCPUs of the running computes: what counts against the workspace quota."""
    return float(conn.execute(select(func.coalesce(func.sum(computes.c.vcpu), 0))
                              .where(computes.c.state == ComputeState.RUNNING)).scalar())

"""The environment cache around the builder. The only writer of ``environments`` and
``environment_refs``.

It owns: one build per ``env_id`` at a time (across processes), building in a temporary
directory and renaming into place, reference counts per holder (a session), least-recently-used
eviction within a disk budget (never while referenced), failed builds remembered briefly, and one
build log per environment whose tail goes into the error.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from flowsession.backends.uv import EnvSpec, UvEnvBuilder, parse_pins, tree_size
from flowsession.config import Settings, format_size
from flowsession.environments import fsops
from flowsession.environments.buildlog import BuildLog
from flowsession.environments.state import BuildState
from flowsession.errors import DiskBudgetExceeded, EnvironmentInUse, FlowSessionError, NotFound
from flowsession.store import Store
from flowsession.store.tables import environment_refs, environments


@dataclass(frozen=True)
class Environment:
    id: str
    image: str
    lock: str
    python_version: str
    platform: str
    state: BuildState  # BUILDING | READY | FAILED | REMOTE (built where its sessions run)
    path: str
    size_bytes: int | None
    error: str | None
    created_at: float
    last_used_at: float
    failed_at: float | None
    refs: int = 0

    def __post_init__(self) -> None:  # a row holds the value
        object.__setattr__(self, "state", BuildState(self.state))

    @property
    def python(self) -> Path:
        return Path(self.path) / "bin" / "python"

    def packages(self) -> dict[str, str]:
        return parse_pins(self.lock)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["error"] = json.loads(self.error)["message"] if self.error else None
        d["packages"] = len(self.packages())
        return d


class EnvironmentCache:
    def __init__(self, settings: Settings, store: Store, builder: UvEnvBuilder,
                 clock: Callable[[], float] = time.time):
        self.settings, self.store, self.builder, self.clock = settings, store, builder, clock

    # --- reading ---------------------------------------------------------------------------

    def get(self, env_id: str) -> Environment:
        env = self._find(env_id)
        if env is None:
            raise NotFound(f"environment {env_id} does not exist",
                           hint="list environments with: flowsession env list")
        return env

    def find(self, env_id: str) -> Environment | None:
        """The environment's record, or None (never built, or forgotten)."""
        return self._find(env_id)

    def list(self) -> list[Environment]:
        refs = (select(environment_refs.c.env_id, func.count().label("refs"))
                .group_by(environment_refs.c.env_id).subquery())
        q = (select(environments, func.coalesce(refs.c.refs, 0).label("refs"))
             .outerjoin(refs, refs.c.env_id == environments.c.id)
             .order_by(environments.c.last_used_at.desc()))
        with self.store.engine.connect() as c:
            return [Environment(**r._mapping) for r in c.execute(q)]

    def log_path(self, env_id: str) -> Path:
        return self.settings.logs_dir / "envs" / f"{env_id}.log"

    # --- building --------------------------------------------------------------------------

    async def ensure(self, spec: EnvSpec, *, holder: str | None = None,
                     credentials: Mapping[str, str] | None = None) -> Environment:
        """The environment for ``spec``, built if needed. With ``holder``, a reference is taken
        in the same step, so the environment cannot be evicted between build and use."""
        env_id = self.builder.env_id(spec)
        env = self._ready(env_id, holder)
        if env is not None:
            return env
        self._raise_if_recently_failed(env_id)
        final = self.settings.envs_dir / env_id
        async with fsops.exclusive(self.settings.envs_dir / ".locks" / f"{env_id}.lock"):
            env = self._ready(env_id, holder)  # another process may have built it meanwhile
            if env is not None:
                return env
            fsops.clear_stale(final)
            self._begin(env_id, spec, final)
            tmp = fsops.temp_dir_for(final)
            try:
                with BuildLog(self.log_path(env_id), secrets=(credentials or {}).values()) as log:
                    log.step(f"building environment {env_id} over {spec.image.ref}")
                    await self.builder.build(spec, tmp, log, credentials=credentials)
                    size = tree_size(tmp)
                    self._make_room(size, keep=env_id)
                    fsops.install(tmp, final)
                    log.step(f"ready: {len(parse_pins(spec.lock))} packages, {format_size(size)}")
            except FlowSessionError as exc:
                fsops.discard(tmp)
                self._fail(env_id, exc, remember=not isinstance(exc, DiskBudgetExceeded))
                raise
            except BaseException:
                fsops.discard(tmp)
                self._forget(env_id)
                raise
            now = self.clock()
            with self.store.engine.begin() as c:
                c.execute(update(environments).where(environments.c.id == env_id).values(
                    state=BuildState.READY, size_bytes=size, last_used_at=now, error=None,
                    failed_at=None))
                if holder:
                    self._add_ref(c, env_id, holder)
        return self.get(env_id)

    def remember(self, spec: EnvSpec, *, holder: str | None = None) -> Environment:
        """Record an environment that is built where its sessions run (a Ray cluster's
        nodes), not here: its lock and image (what ``packages`` shows) and its holders. One
        already built here stays as it is."""
        env_id = self.builder.env_id(spec)
        now = self.clock()
        with self.store.engine.begin() as c:
            if c.execute(update(environments).where(environments.c.id == env_id)
                         .values(last_used_at=now)).rowcount == 0:
                try:
                    with c.begin_nested():
                        c.execute(insert(environments).values(
                            id=env_id, image=spec.image.ref, lock=spec.lock,
                            python_version=spec.image.python_version,
                            platform=spec.image.platform, state=BuildState.REMOTE,
                            path=str(self.settings.envs_dir / env_id), size_bytes=None,
                            error=None, failed_at=None, created_at=now, last_used_at=now))
                except IntegrityError:
                    pass  # recorded meanwhile by another process
            if holder:
                self._add_ref(c, env_id, holder)
        return self.get(env_id)

    # --- references ------------------------------------------------------------------------

    def acquire(self, env_id: str, holder: str) -> None:
        self.get(env_id)
        with self.store.engine.begin() as c:
            self._add_ref(c, env_id, holder)
            c.execute(update(environments).where(environments.c.id == env_id)
                      .values(last_used_at=self.clock()))

    def release(self, env_id: str, holder: str) -> None:
        with self.store.engine.begin() as c:
            c.execute(delete(environment_refs).where(environment_refs.c.env_id == env_id,
                                                     environment_refs.c.holder == holder))

    def holders(self, env_id: str) -> list[str]:
        with self.store.engine.connect() as c:
            return [r.holder for r in c.execute(
                select(environment_refs.c.holder).where(environment_refs.c.env_id == env_id))]

    # --- eviction --------------------------------------------------------------------------

    def remove(self, env_id: str) -> None:
        """Delete an unreferenced environment (``flowsession env remove``)."""
        env = self.get(env_id)
        if env.refs or self.holders(env_id):
            raise EnvironmentInUse(
                f"environment {env_id} is in use by {', '.join(self.holders(env_id))}",
                hint="stop the sessions that use it first")
        self._delete(env)

    def _make_room(self, needed: int, *, keep: str) -> list[str]:
        """Evict unreferenced environments, least recently used first, until ``needed`` fits."""
        budget = self.settings.env_disk_budget
        ready = [e for e in self.list() if e.state == BuildState.READY and e.id != keep]
        used = sum(e.size_bytes or 0 for e in ready)
        evicted = []
        for env in sorted((e for e in ready if not e.refs), key=lambda e: e.last_used_at):
            if used + needed <= budget:
                break
            if self._delete(env, only_if_unreferenced=True):
                used -= env.size_bytes or 0
                evicted.append(env.id)
        if used + needed > budget:
            in_use = [e for e in ready if e.refs]
            raise DiskBudgetExceeded(
                f"environment {keep} needs {format_size(needed)} but the disk budget is "
                f"{format_size(budget)} and {format_size(used)} of it is held by "
                f"{len(in_use)} environment(s) in use by sessions",
                hint="stop sessions you no longer need, or raise FLOWSESSION_ENV_DISK_BUDGET",
                needed=needed, budget=budget, used=used)
        return evicted

    def _delete(self, env: Environment, *, only_if_unreferenced: bool = False) -> bool:
        with self.store.engine.begin() as c:
            if only_if_unreferenced and c.execute(select(func.count()).select_from(
                    environment_refs).where(environment_refs.c.env_id == env.id)).scalar():
                return False
            c.execute(delete(environment_refs).where(environment_refs.c.env_id == env.id))
            c.execute(delete(environments).where(environments.c.id == env.id))
        fsops.discard(Path(env.path))
        return True

    # --- rows ------------------------------------------------------------------------------

    def _find(self, env_id: str) -> Environment | None:
        q = (select(environments, select(func.count()).select_from(environment_refs)
                    .where(environment_refs.c.env_id == environments.c.id)
                    .scalar_subquery().label("refs"))
             .where(environments.c.id == env_id))
        with self.store.engine.connect() as c:
            row = c.execute(q).first()
        return Environment(**row._mapping) if row else None

    def _ready(self, env_id: str, holder: str | None) -> Environment | None:
        """The environment if built and on disk; marks it used (and referenced by holder)."""
        env = self._find(env_id)
        if env is None or env.state != BuildState.READY:
            return None
        if not Path(env.path, "pyvenv.cfg").exists():  # deleted behind our back
            self._forget(env_id)
            return None
        with self.store.engine.begin() as c:
            c.execute(update(environments).where(environments.c.id == env_id)
                      .values(last_used_at=self.clock()))
            if holder:
                self._add_ref(c, env_id, holder)
        return self._find(env_id)

    def _begin(self, env_id: str, spec: EnvSpec, final: Path) -> None:
        now = self.clock()
        values = dict(image=spec.image.ref, lock=spec.lock, python_version=spec.image.python_version,
                      platform=spec.image.platform, state=BuildState.BUILDING, path=str(final),
                      size_bytes=None, error=None, failed_at=None, last_used_at=now)
        with self.store.engine.begin() as c:
            if c.execute(update(environments).where(environments.c.id == env_id)
                         .values(**values)).rowcount == 0:
                c.execute(insert(environments).values(id=env_id, created_at=now, **values))

    def _fail(self, env_id: str, exc: FlowSessionError, *, remember: bool) -> None:
        if not remember:
            self._forget(env_id)
            return
        error = json.dumps({"class": type(exc).__name__, **exc.to_dict(), "message": exc.message})
        with self.store.engine.begin() as c:
            c.execute(update(environments).where(environments.c.id == env_id)
                      .values(state=BuildState.FAILED, error=error, failed_at=self.clock()))

    def _forget(self, env_id: str) -> None:
        with self.store.engine.begin() as c:
            c.execute(delete(environment_refs).where(environment_refs.c.env_id == env_id))
            c.execute(delete(environments).where(environments.c.id == env_id))

    def _raise_if_recently_failed(self, env_id: str) -> None:
        env = self._find(env_id)
        if env is None or env.state != BuildState.FAILED or env.failed_at is None:
            return
        age = self.clock() - env.failed_at
        if age > self.settings.failed_build_memory_seconds or not env.error:
            return
        data = json.loads(env.error)
        data.pop("class", None)
        data["message"] = (f"{data.get('message', '')}\n(this build failed {age:.0f}s ago; "
                           "retrying is paused briefly)")
        raise FlowSessionError.from_dict(data)

    @staticmethod
    def _add_ref(conn, env_id: str, holder: str) -> None:
        try:
            with conn.begin_nested():
                conn.execute(insert(environment_refs).values(
                    env_id=env_id, holder=holder, created_at=time.time()))
        except IntegrityError:
            pass  # already held by this holder

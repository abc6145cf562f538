"""The sessions service: every operation of the reference documents on a session.

start (default or advanced settings), show, list, events, install (Save and install: atomic),
packages, logs, reset, stop, update, and a test line. One flow binds to one session; a session
runs on one compute of its owner. Only ``SessionRecords.transition`` changes a state.

A session is addressed by its id (``get``) or by its flow (``of_flow``, which loads the flow's
folder to find its key). Each operation is written once, on a ``Session`` (``refresh``,
``session_events``, ``stop_session``, ...); the flow forms (``show``, ``events``, ``stop``, ...)
find the flow's session and call it. Showing, stopping, listing and the sweep need nothing but
the record, so a session whose flow folder was deleted or moved still shows and stops.

Beside it: the start options and their checks (``options``), Save and install's steps
(``install``), reclaiming idle sessions for an implicit start (``quota``), which limit held
when a worker died (``held``), the reconciler and idle culler (``sweep``), the standby pool
(``pool``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from flowsession.backends.compute import procs
from flowsession.backends.compute.base import (
    ComputeBackend,
    EnvHandle,
    EnvRecipe,
    SessionHandle,
    SessionSpec,
)
from flowsession.computes.service import Compute, ComputeKind, ComputeService, ComputeState
from flowsession.config import Settings
from flowsession.environments.cache import Environment
from flowsession.environments.service import EnvironmentService, Package, Prepared
from flowsession.errors import (
    Conflict,
    FlowFolderMissing,
    FlowNotFound,
    FlowSessionError,
    InvalidInput,
    LineFailed,
    NotFound,
    SessionFailed,
)
from flowsession.flows.flowfile import FlowDefinition, load_flow
from flowsession.sessions import install as save_and_install
from flowsession.sessions.held import LimitWatch
from flowsession.sessions.options import StartOptions, check_options, runs_as_asked
from flowsession.sessions.pool import StandbyPool
from flowsession.sessions.quota import Busy, provision_with_reclaim
from flowsession.sessions.records import ACTIVE_STATES, Event, Session, SessionRecords
from flowsession.sessions.state import SessionState as S
from flowsession.sessions.sweep import Sweeper
from flowsession.store import Store, open_store

LOG_TAIL_BYTES = 64 * 1024  # what ``session_logs`` shows unless asked for more (or less)


class SessionService:
    def __init__(self, settings: Settings, store: Store, *, envs: EnvironmentService,
                 computes: ComputeService, backend: ComputeBackend,
                 clock: Callable[[], float] = time.time):
        self.settings, self.store, self.clock = settings, store, clock
        self.envs, self.computes, self.backend = envs, computes, backend
        self.records = SessionRecords(store, clock)
        self.pool = StandbyPool(settings, store, backend, envs)
        self._connections = None  # access.connections.ConnectionService, made on first use
        self.sweeper = Sweeper(self)
        self.busy = Busy()  # test lines in flight: such a session is not idle
        self.held = LimitWatch(computes)  # which limit killed a worker, told from the compute

    @classmethod
    def open(cls, settings: Settings | None = None) -> SessionService:
        from flowsession.backends.compute import registry

        settings = settings or Settings.from_env()
        store = open_store(settings.db_url)
        backend = registry.create(settings)
        envs = EnvironmentService(settings, store)
        return cls(settings, store, envs=envs, computes=ComputeService(settings, store, backend),
                   backend=backend)

    # --- addressing: a session by its id, or the one bound to a flow -----------------------

    def flow_key(self, flow: str | Path) -> str:
        return str(load_flow(flow).folder)

    def get(self, session_id: str, *, user: str | None) -> Session:
        """Session ``session_id``, if it is ``user``'s (None: anyone's, for those who manage
        everything). Another user's session is NotFound exactly like one that does not
        exist. Needs nothing but the record."""
        try:
            session = self.records.get(session_id)
        except NotFound:
            session = None
        if session is None or (user is not None and session.owner != user):
            raise NotFound(f"session {session_id} does not exist",
                           hint="list your sessions: flowsession session list",
                           details={"session": session_id})
        return session

    def of_flow(self, flow: str | Path, *, user: str) -> Session:
        """The session bound to the flow folder ``flow`` (loaded, to find its key)."""
        return self.bound(self.flow_key(flow), user=user)

    def bound(self, key: str, *, user: str) -> Session:
        """The session bound to the flow key ``key`` (a flow folder's path as stored), without
        loading the flow."""
        session = self.records.bound_to(key)
        if session is None or session.owner != user:
            raise NotFound(f"flow {key} has no session",
                           hint="start one: flowsession session start FLOW")
        return session

    def session_flow(self, session: Session, *, needed_by: str) -> FlowDefinition:
        """The session's flow, loaded from its folder: FlowFolderMissing (409, nothing
        changed) when the folder was deleted or moved, for what needs it (a reset, an
        install)."""
        try:
            return load_flow(session.flow)
        except FlowNotFound:
            raise FlowFolderMissing(
                f"the flow folder of session {session.id} no longer exists: {session.flow} "
                f"(deleted or moved); {needed_by} needs it",
                hint=f"stop the session (flowsession session stop {session.id}), or restore "
                     f"the folder at {session.flow} and try again",
                details={"session": session.id, "flow": session.flow,
                         "state": session.state}) from None

    # --- reading ---------------------------------------------------------------------------

    async def show(self, flow: str | Path, *, user: str) -> Session:
        return await self.refresh(self.of_flow(flow, user=user))

    async def refresh(self, session: Session) -> Session:
        """The session as it is now: its backend asked first (the record is a belief)."""
        await self.sweeper.reconcile_one(session)
        return self.records.get(session.id)

    async def list(self, *, user: str | None, include_stopped: bool = False) -> list[Session]:
        await self.sweeper.sweep()
        states = None if include_stopped else ACTIVE_STATES
        return self.records.list(owner=user, states=states)

    def events(self, flow: str | Path, *, user: str) -> list[Event]:
        """The state changes of every session the flow has had."""
        key = self.flow_key(flow)
        ids = [sid for sid in self.records.history(key) if self.records.get(sid).owner == user]
        if not ids:
            raise NotFound(f"flow {key} has had no session",
                           hint="start one: flowsession session start FLOW")
        return self.records.events(ids)

    def session_events(self, session: Session) -> list[Event]:
        """The session's own state changes: who, when, from, to, why."""
        return self.records.events([session.id])

    def packages(self, flow: str | Path, *, user: str) -> list[Package]:
        return self.session_packages(self.of_flow(flow, user=user))

    def session_packages(self, session: Session) -> list[Package]:
        """View installed packages: what the session's environment holds."""
        if not session.env_id or session.state == S.STOPPED:
            raise Conflict(f"session {session.id} is {session.state}: it has no environment"
                           + ("" if session.state == S.STOPPED else " yet"),
                           details={"state": session.state})
        return self.envs.packages(self.envs.cache.get(session.env_id))

    async def session_logs(self, session: Session, *, tail_bytes: int = LOG_TAIL_BYTES) -> str:
        """The end of the session's supervisor and worker log, as text the backend bounded."""
        handle = session.session_handle
        if handle is not None:
            return await self.backend.logs(handle, tail_bytes=tail_bytes)
        kept = await self.backend.ended_log(session.id, tail_bytes=tail_bytes)
        if not kept:
            raise Conflict(f"session {session.id} is {session.state}: it has no supervisor "
                           "and no log was kept", hint="its events say what happened: "
                           f"flowsession session events {session.id}",
                           details={"state": session.state})
        return kept

    # --- start -----------------------------------------------------------------------------

    async def start(self, flow: str | Path, *, user: str,
                    options: StartOptions | None = None) -> Session:
        """Start the flow's session (or return the one already bound to it)."""
        options = options or StartOptions()
        flow_def = load_flow(flow)  # bad flows fail here, before anything is made
        compute_type = check_options(options, self.computes)
        instance = (self.computes.get(options.instance, user=user)
                    if compute_type == ComputeKind.INSTANCE else None)
        if instance is not None and instance.state != ComputeState.RUNNING:
            raise Conflict(f"compute instance '{instance.name}' is {instance.state}",
                           hint=f"start it: flowsession compute start {instance.name}")
        identity = instance.identity if instance else (options.identity or "user")
        session, created = self.records.create_bound(
            flow=str(flow_def.folder), actor=user, owner=user, compute_type=compute_type,
            compute_id=instance.id if instance else None,
            vm_size=instance.vm_size if instance else options.vm_size or (
                self.computes.smallest_size().name if options.implicit else None),
            image=options.image, identity=identity, operator=procs.identity(),
            idle_timeout_s=(options.idle_timeout_s if options.idle_timeout_s is not None
                            else self.settings.idle_timeout_s))
        if not created:
            if session.owner != user:
                raise Conflict(f"flow {session.flow} is bound to another user's session",
                               hint="one flow binds to one session")
            await self.sweeper.reconcile_one(session)  # the belief may be stale
            session = await self._settled(self.records.get(session.id))
            if session.state == S.STOPPED:  # it had ended (idle, say): start a new one
                return await self.start(flow, user=user, options=options)
            return session
        return await self._launch(session, flow_def.folder, actor=user, reason="started",
                                  reclaim=options.implicit)

    async def _launch(self, session: Session, flow: Path, *, actor: str, reason: str,
                      reclaim: bool = False) -> Session:
        """NOT_STARTED/RESETTING -> BUILDING -> STARTING -> RUNNING, or cleaned up on failure."""
        session = self.records.transition(session, S.BUILDING, actor=actor,
                                          reason="building the environment",
                                          operator=procs.identity())
        standby: asyncio.Task | None = None
        try:
            compute = await self._compute_for(session, reclaim=reclaim)
            prepared = await self.envs.prepare(flow, identity=self._secrets_of(session),
                                               image=session.image)
            # the supervisor imports the runtime while the environment builds
            standby = asyncio.create_task(self.pool.claim_or_start(
                prepared.image.ref, compute=compute.compute_handle))
            env = await self._environment(session, prepared, holder=session.holder)
            session = self.records.transition(
                session, S.STARTING, actor=actor, reason="starting the supervisor"
                + (f"; {prepared.note}" if prepared.note else ""),
                env_id=env.id, snapshot_id=prepared.snapshot.id, image=prepared.image.ref)
            handle = await self._run_on(compute, session, prepared, env, await standby)
            standby = None
            session = self.records.transition(
                session, S.RUNNING, actor=actor, reason=reason, operator=None,
                handle=handle.json_text(), last_activity_at=self.clock())
            self.computes.touch(session.compute_id)
            return session
        except BaseException as exc:
            if standby is not None:
                await self.pool.discard(standby)
            await self._cleanup_failed_start(session.id, actor, exc)
            raise

    async def _run_on(self, compute: Compute, session: Session, prepared: Prepared,
                      env: Environment, standby: SessionHandle | None) -> SessionHandle:
        spec = SessionSpec(session_id=session.id, flow_dir=str(prepared.snapshot.path),
                           idle_timeout_s=session.idle_timeout_s, workers=1,
                           connections=self.flow_connections(session))
        recipe = (self.envs.recipe(prepared, identity=self._secrets_of(session))
                  if self.backend.builds_environments else None)
        return await self.backend.start_session(compute.compute_handle,
                                                self.env_handle(env, recipe=recipe),
                                                spec, standby=standby)

    async def _environment(self, session: Session, prepared: Prepared, *,
                           holder: str) -> Environment:
        """The flow's environment: built here, or (a backend that builds environments where
        its sessions run) recorded here and built there at the start."""
        if self.backend.builds_environments:
            return self.envs.remember(prepared, holder=holder)
        return await self.envs.ensure(prepared, identity=self._secrets_of(session),
                                      holder=holder)

    async def _cleanup_failed_start(self, session_id: str, actor: str,
                                    exc: BaseException) -> None:
        """A start that failed leaves nothing half-started: the session is stopped."""
        why = (exc.message if isinstance(exc, FlowSessionError)
               else "interrupted" if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt))
               else f"{type(exc).__name__}: {exc}")
        await self._stop(self.records.get(session_id), actor=actor,
                         reason=f"the start failed: {why.splitlines()[0]}")

    async def _settled(self, session: Session, timeout: float = 600) -> Session:
        """Wait for another start of the same session to finish."""
        deadline = self.clock() + timeout
        while session.state in (S.NOT_STARTED, S.BUILDING, S.STARTING, S.RESETTING):
            if not procs.identity_alive(session.operator) or self.clock() > deadline:
                await self.sweeper.reconcile_one(session)
                break
            await asyncio.sleep(0.1)
            session = self.records.get(session.id)
        return self.records.get(session.id)

    # --- operations on a running session ---------------------------------------------------

    async def install(self, flow: str | Path, *, user: str) -> Session:
        return await self.install_session(self.of_flow(flow, user=user), actor=user)

    def check_install(self, session: Session) -> None:
        """Save and install needs a RUNNING session and its flow's folder (409 otherwise)."""
        save_and_install.check_install(self, session)

    async def install_session(self, session: Session, *, actor: str) -> Session:
        """Save and install (``sessions.install``): the new environment is built beside the
        running one; on failure the session keeps running unchanged."""
        return await save_and_install.install_session(self, session, actor=actor)

    async def reset(self, flow: str | Path, *, user: str, reason: str = "reset") -> Session:
        return await self.reset_session(self.of_flow(flow, user=user), actor=user,
                                        reason=reason)

    async def reset_session(self, session: Session, *, actor: str,
                            reason: str = "reset") -> Session:
        """Delete and recreate with the same settings; a changed image or requirements file is
        picked up. Without the flow's folder nothing changes (FlowFolderMissing)."""
        self.session_flow(session, needed_by="a reset")
        session = self.records.transition(session, S.RESETTING, actor=actor, reason=reason,
                                          operator=procs.identity(),
                                          expect=[S.RUNNING, S.FAILED])
        await self._release_runtime(session)
        session = self.records.set_and_get(session.id, handle=None, env_id=None)
        return await self._launch(session, Path(session.flow), actor=actor, reason="reset")

    async def stop(self, flow: str | Path, *, user: str, reason: str = "stopped") -> Session:
        return await self.stop_session(self.of_flow(flow, user=user), actor=user, reason=reason)

    async def stop_session(self, session: Session, *, actor: str,
                           reason: str = "stopped") -> Session:
        """Delete the session and release its compute (its vCPUs are free at once). Needs
        nothing but the record: never the flow's folder."""
        return await self._stop(self.records.get(session.id), actor=actor, reason=reason)

    async def _stop(self, session: Session, *, actor: str, reason: str) -> Session:
        if session.state != S.STOPPING:
            session = self.records.transition(session, S.STOPPING, actor=actor, reason=reason)
        await self._release_runtime(session)
        self.records.unbind(session)
        session = self.records.transition(session, S.STOPPED, actor=actor, reason=reason,
                                          handle=None, operator=None)
        if not await self.computes.release_if_unused(session.compute_id):
            self.computes.touch(session.compute_id)
        return session

    async def _release_runtime(self, session: Session) -> None:
        handle = session.session_handle
        if handle is not None:
            await self.backend.stop_session(handle, reason=session.reason or "")
        if session.env_id:
            self.envs.cache.release(session.env_id, session.holder)

    async def update(self, flow: str | Path, *, user: str, vm_size: str | None = None,
                     idle_timeout_s: float | None = None, identity: str | None = None,
                     instance: str | None = None) -> Session:
        return await self.update_session(self.of_flow(flow, user=user), actor=user,
                                         vm_size=vm_size, idle_timeout_s=idle_timeout_s,
                                         identity=identity, instance=instance)

    async def update_session(self, session: Session, *, actor: str, vm_size: str | None = None,
                             idle_timeout_s: float | None = None, identity: str | None = None,
                             instance: str | None = None) -> Session:
        """Change settings: idle time and identity in place; a VM size or instance resets
        (which needs the flow's folder: checked before anything changes)."""
        session = self.records.get(session.id)
        if session.state == S.STOPPED:
            raise Conflict(f"session {session.id} is STOPPED: there is nothing to change",
                           hint="start a new session: flowsession session start FLOW",
                           details={"state": session.state})
        if session.compute_type == ComputeKind.INSTANCE and (vm_size or identity):
            raise InvalidInput("a session on a compute instance uses the instance's VM size and "
                               "identity", hint="change the instance, or use --instance")
        if session.compute_type == ComputeKind.SERVERLESS and instance:
            raise InvalidInput("--instance moves a session to a compute instance: stop this "
                               "serverless session and start one with --compute-type instance")
        if vm_size or instance:
            self.session_flow(session, needed_by="moving it to another compute (a reset)")
        if idle_timeout_s is not None:
            self.records.set(session.id, idle_timeout_s=idle_timeout_s)
            if session.session_handle and session.state == S.RUNNING:
                await self.backend.configure(session.session_handle,
                                             idle_timeout_s=idle_timeout_s)
        if identity:
            self.records.set(session.id, identity=identity)
        if vm_size or instance:
            target = (self.computes.get(instance, user=session.owner) if instance
                      else None)
            size = self.computes.size(vm_size) if vm_size else None
            self.records.set(session.id, vm_size=target.vm_size if target else  # the instance's
                             size.name if size else session.vm_size,
                             compute_id=target.id if target else None)
            old_compute = session.compute_id
            session = await self.reset_session(session, actor=actor,
                                               reason=f"moved to {instance or size.name}")
            if old_compute != session.compute_id:
                await self.computes.release_if_unused(old_compute)
        return self.records.get(session.id)

    async def test(self, flow: str | Path, inputs: Mapping[str, Any], *, user: str,
                   timeout: float = 600, init: Mapping[str, Any] | None = None,
                   with_trace: bool = False) -> dict[str, Any]:
        """One line on the flow's session (started with default settings if none runs), with
        the connections the flow refers to as they are now, and ``init`` for a flex flow
        class."""
        session = await self.ready(flow, user=user)
        try:
            with self.busy.line(session.id):
                return await self.backend.test_line(
                    session.session_handle, inputs, timeout=timeout,
                    connections=self.flow_connections(session), init=dict(init or {}),
                    **({"with_trace": True} if with_trace else {}))
        except SessionFailed as exc:
            exc.message = self.held.explain(session, exc.message)
            self.records.transition(session, S.FAILED, actor="system:supervisor",
                                    reason=exc.message, expect=[S.RUNNING])
            raise
        except LineFailed as exc:
            exc.message = self.held.explain(session, exc.message)
            if exc.details.get("worker_died"):  # the session goes on; say why in its events
                self.records.note(session.id, actor="system:supervisor", reason=exc.message)
            raise
        finally:
            self.records.touch(session.id)
            self.computes.touch(session.compute_id)

    @staticmethod
    def _secrets_of(session: Session) -> str:
        """Whose feed secrets fill the session's ``{private}`` feeds: its managed identity's,
        or its owner's own."""
        from flowsession.access.secrets import holder

        return holder(session.identity, session.owner)

    def flow_connections(self, session: Session) -> dict[str, Any]:
        """The connections the session's flow refers to that its owner (or its managed
        identity) has, in promptflow's form: for the session's workers, never stored. A
        missing one is not an error here: the flow's load says which."""
        from flowsession.access.connections import ConnectionService
        from flowsession.flows.references import connection_candidates, required_connections

        if self._connections is None:
            self._connections = ConnectionService(self.settings, self.store)
        flow = load_flow(session.flow)
        names = required_connections(flow) | connection_candidates(flow)
        identity = None if session.identity in ("", "user") else session.identity
        usable = self._connections.usable_names(session.owner, identity=identity)
        return self._connections.for_executor_as(names & usable, owner=session.owner,
                                                 identity=identity)

    async def ready(self, flow: str | Path, *, user: str,
                    options: StartOptions | None = None) -> Session:
        """The flow's RUNNING session with the flow's current files loaded: started (with
        ``options``, else default settings) when none runs."""
        key = self.flow_key(flow)
        options = replace(options or StartOptions(), implicit=True)
        session = self.records.bound_to(key)
        if session is None or session.owner != user or session.state == S.STOPPED:
            session = await self.start(key, user=user, options=options)
        elif session.state != S.RUNNING:
            await self.sweeper.reconcile_one(session)
            session = await self._settled(self.records.get(session.id))
            if session.state == S.STOPPED:
                session = await self.start(key, user=user, options=options)
        if session.state == S.FAILED:
            raise SessionFailed(f"session {session.id} failed: {session.reason}",
                                hint="reset it: flowsession session reset FLOW")
        if session.state != S.RUNNING:
            raise Conflict(f"session {session.id} is {session.state}",
                           details={"state": session.state})
        if options is not None:
            runs_as_asked(session, options, self.computes)
        self.records.touch(session.id)
        return await self._load_changes(session)

    async def stop_compute(self, compute: Compute, *, actor: str, reason: str) -> Compute:
        """Stop a compute instance: the sessions on it stop first, with the reason."""
        if compute.kind != ComputeKind.INSTANCE:
            raise Conflict(f"compute '{compute.name}' is serverless: it stops with its sessions",
                           hint="stop its sessions: flowsession session stop FLOW")
        for session in self.records.list(owner=None, states=ACTIVE_STATES):
            if session.compute_id == compute.id:
                await self._stop(session, actor=actor,
                                 reason=f"compute instance {compute.name} stopped: {reason}")
        return await self.computes.stop(compute, reason=reason)

    async def _load_changes(self, session: Session) -> Session:
        """Edited flow files take effect at the next line, as on the flow page: a changed
        snapshot is loaded by fresh workers. (Changed requirements need Save and install.)"""
        snapshot = self.envs.snapshot(session.flow)
        if snapshot.id == session.snapshot_id:
            return session
        await self.backend.reload(session.session_handle, snapshot.path)
        return self.records.set_and_get(session.id, snapshot_id=snapshot.id)

    # --- helpers ---------------------------------------------------------------------------

    def env_handle(self, env: Environment, *, recipe: EnvRecipe | None = None) -> EnvHandle:
        """The image's handle plus the environment's own layer (added at adoption), and the
        recipe to build it where the session runs (for backends that do)."""
        site = sorted(Path(env.path).glob("lib/python*/site-packages"))
        return replace(self.pool.image_env(env.image), env_id=env.id,
                       site_dirs=tuple(str(p) for p in site), recipe=recipe)

    async def _compute_for(self, session: Session, *, reclaim: bool = False) -> Compute:
        if session.compute_id:  # an instance, or a serverless compute kept across a reset
            compute = self.computes.get(session.compute_id, user=session.owner)
            if compute.state != ComputeState.RUNNING:
                raise Conflict(f"compute '{compute.name}' is {compute.state}",
                               hint=f"start it: flowsession compute start {compute.name}")
            return compute
        size = (self.computes.size(session.vm_size) if session.vm_size
                else self.computes.default_size(or_smallest=True))
        compute = await provision_with_reclaim(  # an implicit start reclaims idle sessions
            self, session, size, lambda: self.computes.provision_serverless(
                user=session.owner, size=size, identity=session.identity), reclaim=reclaim)
        self.records.set(session.id, compute_id=compute.id, vm_size=size.name)
        return compute

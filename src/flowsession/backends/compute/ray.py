"""The Ray compute backend: sessions on a Ray cluster (``FLOWSESSION_BACKEND=ray``,
``FLOWSESSION_RAY_ADDRESS=host:port``; the ``ray`` extra, the same Ray version as the cluster).

- A **compute** is a placement group of its VM size's shape (one bundle: ``CPU`` = vCPUs,
  ``memory`` = its memory), detached and named ``fs-<compute id>``, ``STRICT_PACK`` and not
  pinned, so Ray places it (and an autoscaler adds a node for it); ``release`` removes it. A
  serverless compute is made for its session and released with it; an instance is made when
  its owner starts it -- the service decides which, the backend only books and frees.
- A **session** is a detached, named actor (``fs-<slot>``, in the control plane's namespace)
  running ``flowsession.node.actor.SessionActor`` in Ray's own interpreter, in its compute's
  bundle. It builds the image and the flow's environment on its node with the same builder and
  environment cache as the control plane (``EnvHandle.recipe``: the feeds' secrets in memory
  only), starts the unchanged supervisor as its child in that environment, under bubblewrap
  where the node has it, within the VM size's limits, and relays the supervisor's protocol.
  Flows travel as snapshots (bytes, content-addressed: a node keeps one copy).
- What comes back is data, validated and bounded here exactly as for the local backend
  (``client.SupervisorClient``): records, log text, reasons. An ended session's records and
  log are handed over by its actor when it is stopped and kept in the control plane's folders.
- Handles hold the actor's name, namespace and node: a restarted control plane finds the
  actor by name (``ray.get_actor``), or reports the session lost.

Ray is imported on first use only (it takes a second).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

from flowsession.backends.compute import boundary, transfer
from flowsession.backends.compute.base import (
    BackendState,
    BackendStatus,
    ComputeHandle,
    ComputeSpec,
    EnvHandle,
    EnvRecipe,
    SessionHandle,
    SessionSpec,
)
from flowsession.backends.compute.client import AnswerTooLong, SupervisorClient, Unreachable
from flowsession.backends.compute.slots import SLOT_ID
from flowsession.computes.service import ComputeKind
from flowsession.config import Settings
from flowsession.errors import BuildFailed, FlowSessionError, InvalidInput, SessionFailed

PREFIX = "fs-"  # of the names of our actors ("fs-s<hex>") and placement groups ("fs-cmp-...")
PLACEMENT_TIMEOUT_S = 120.0  # a compute's placement group must be placed within this
BUILD_TIMEOUT_S = 1800.0  # an image and an environment built on a node
CALL_S = 30.0  # beyond a relayed request's own timeout
LINGER_S = 3600.0
MOVE_WAIT_S = 5.0  # a serverless compute's bundle, booked again next to a standby
UNREACHABLE = "_unreachable"  # flowsession.node.actor.UNREACHABLE (not imported: no ray here)
TOO_LONG = "_too_long"  # flowsession.node.actor.TOO_LONG


class RayBackend(SupervisorClient):
    name: ClassVar[str] = "ray"
    builds_environments: ClassVar[bool] = True

    def __init__(self, settings: Settings):
        self.settings = settings
        self._namespace: str | None = None
        self._actors: dict[str, Any] = {}
        # how long an actor whose session ended by itself (idle) keeps what it left for the
        # control plane to see and collect, before it exits
        self.linger_s = LINGER_S

    # --- the cluster ---------------------------------------------------------------------------

    def _ray(self):
        import ray

        if not ray.is_initialized():
            if not self.settings.ray_address:
                raise InvalidInput("the ray backend needs the cluster's address",
                                   hint="set FLOWSESSION_RAY_ADDRESS=host:port (the head's GCS)")
            ray.init(address=self.settings.ray_address, namespace=self.settings.ray_namespace,
                     log_to_driver=False, configure_logging=False)
        if self._namespace is None:
            self._namespace = ray.get_runtime_context().namespace
        return ray

    @property
    def namespace(self) -> str:
        self._ray()
        return self._namespace or self.settings.ray_namespace

    def _actor(self, handle: SessionHandle) -> Any | None:
        """The session's actor, found by name (None: it is gone)."""
        ray = self._ray()
        actor = self._actors.get(handle.slot)
        if actor is None:
            try:
                actor = ray.get_actor(handle.slot, namespace=handle.ref.get("namespace")
                                      or self.namespace)
            except ValueError:
                return None
            self._actors[handle.slot] = actor
        return actor

    async def _get(self, ref: Any, timeout: float) -> Any:
        """A remote call's result; Unreachable when the actor does not answer in time or is
        unavailable; ActorGone when it is dead."""
        from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

        try:
            return await asyncio.wait_for(ref, timeout)
        except (asyncio.TimeoutError, GetTimeoutError, ActorUnavailableError) as exc:
            raise Unreachable(f"the session's actor is not answering "
                              f"({type(exc).__name__})") from None
        except RayActorError as exc:
            raise ActorGone(_died(exc)) from None

    # --- computes ------------------------------------------------------------------------------

    async def provision(self, compute: ComputeSpec) -> ComputeHandle:
        from ray.util.placement_group import placement_group

        self._ray()
        name = f"{PREFIX}{compute.id}"
        bundle = {"CPU": float(compute.size.vcpu), "memory": int(compute.size.memory_bytes)}
        await asyncio.to_thread(placement_group, [bundle], strategy="STRICT_PACK", name=name,
                                lifetime="detached")
        return ComputeHandle(backend=self.name, compute_id=compute.id,
                             limits={"mode": "ray", "placement_group": name,
                                     "namespace": self.namespace, "bundle": bundle,
                                     "kind": compute.kind},
                             vcpu=compute.size.vcpu, memory_bytes=compute.size.memory_bytes)

    async def release(self, handle: ComputeHandle) -> None:
        """Remove the compute's placement group (idempotent): Ray frees its bundle, and an
        autoscaler may then remove the node."""
        from ray.util.placement_group import get_placement_group, remove_placement_group

        self._ray()
        for name in await asyncio.to_thread(self._group_names, handle):
            with contextlib.suppress(Exception):
                group = await asyncio.to_thread(get_placement_group, name)
                await asyncio.to_thread(remove_placement_group, group)

    def _group_names(self, compute: ComputeHandle) -> list[str]:
        """The live placement groups of a compute: ``fs-<id>``, or the one that took its
        place when it was moved next to a standby (``fs-<id>~<n>``)."""
        from ray.util.placement_group import placement_group_table

        base = str(compute.limits.get("placement_group"))
        return sorted({info["name"] for info in placement_group_table().values()
                       if info.get("state") != "REMOVED"
                       and (info.get("name") == base or info.get("name", "").startswith(
                           base + "~"))})

    async def _group(self, compute: ComputeHandle) -> tuple[Any, str, str]:
        """The compute's placement group, placed: the group, its name, its bundle's node."""
        from ray.util.placement_group import get_placement_group

        self._ray()
        names = await asyncio.to_thread(self._group_names, compute)
        if not names:
            raise SessionFailed(f"compute {compute.compute_id} has no placement group on the "
                                "Ray cluster (it was removed)",
                                hint="stop the session; a new start provisions the compute "
                                     "again")
        name = names[-1]
        group = await asyncio.to_thread(get_placement_group, name)
        try:
            await asyncio.wait_for(group.ready(), PLACEMENT_TIMEOUT_S)
        except asyncio.TimeoutError:
            bundle = compute.limits.get("bundle")
            raise SessionFailed(
                f"the Ray cluster has no room for compute {compute.compute_id} ({bundle}): its "
                f"placement group is still pending after {PLACEMENT_TIMEOUT_S:.0f} s",
                hint="add a node that fits (or let the cluster's autoscaler add one), or "
                     "choose a smaller VM size") from None
        return group, name, await self._node_of(group)

    @staticmethod
    async def _node_of(group: Any) -> str:
        from ray.util.placement_group import placement_group_table

        table = await asyncio.to_thread(placement_group_table, group)
        return str((table.get("bundles_to_node_id") or {}).get(0, ""))

    async def _move_next_to(self, compute: ComputeHandle, old: str, node: str) -> bool:
        """Book a serverless compute's bundle on ``node`` instead (where a standby waits),
        if it fits there now: the new group is placed first, then the old one removed. Its
        target is soft: a lost node's group is still placed elsewhere. False: it stays."""
        from ray.util.placement_group import (
            get_placement_group,
            placement_group,
            remove_placement_group,
        )

        if compute.limits.get("kind") != ComputeKind.SERVERLESS or not node:
            return False  # an instance's group is its owner's, shared by its sessions
        bundle = dict(compute.limits.get("bundle") or {})
        name = f"{compute.limits.get('placement_group')}~{uuid.uuid4().hex[:6]}"
        group = await asyncio.to_thread(placement_group, [bundle], strategy="STRICT_PACK",
                                        name=name, lifetime="detached",
                                        _soft_target_node_id=node)
        try:
            await asyncio.wait_for(group.ready(), MOVE_WAIT_S)
            moved = await self._node_of(group) == node
        except asyncio.TimeoutError:
            moved = False
        gone = await asyncio.to_thread(get_placement_group, old) if moved else group
        with contextlib.suppress(Exception):
            await asyncio.to_thread(remove_placement_group, gone)
        return moved

    # --- sessions ------------------------------------------------------------------------------

    async def start_standby(self, env: EnvHandle, *, idle_timeout_s: float,
                            compute: ComputeHandle | None = None) -> SessionHandle:
        """An actor and its supervisor in standby with ``env``'s image: in ``compute``'s
        bundle when given, else wherever Ray puts it (the standby pool's)."""
        from flowsession.node.actor import remote_class

        recipe = _image_only(env)
        self._ray()
        strategy: Any = "DEFAULT"
        group_name = None
        if compute is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            group, group_name, _node = await self._group(compute)
            strategy = PlacementGroupSchedulingStrategy(placement_group=group,
                                                        placement_group_bundle_index=0)
        name = f"{PREFIX}s{uuid.uuid4().hex[:10]}"
        actor = await asyncio.to_thread(lambda: remote_class().options(
            name=name, namespace=self.namespace, lifetime="detached", num_cpus=0,
            max_concurrency=64, max_restarts=0, scheduling_strategy=strategy,
        ).remote({"namespace": self.namespace, "linger_s": self.linger_s}))
        self._actors[name] = actor
        try:
            answer = await self._get(actor.launch.remote(recipe, idle_timeout_s),
                                     BUILD_TIMEOUT_S)
            if not answer.get("ok"):
                raise FlowSessionError.from_dict(answer.get("error") or {})
        except BaseException:
            await self._kill(name, actor)
            raise
        return SessionHandle(
            backend=self.name, session_id=str(answer["slot"]), slot=name,
            sandboxed=bool(answer.get("sandboxed")),
            sandbox_detail=boundary.reason(answer.get("sandbox_detail")), limits_detail="",
            ref={"namespace": self.namespace, "node_id": str(answer.get("node_id")),
                 "pid": answer.get("pid"), "pid_start": answer.get("pid_start"),
                 "placement_group": group_name})

    async def start_session(self, compute: ComputeHandle, env: EnvHandle, spec: SessionSpec,
                            *, standby: SessionHandle | None = None) -> SessionHandle:
        if env.recipe is None:
            raise InvalidInput("the ray backend builds environments on its nodes: it needs "
                               "the environment's recipe")
        _group, group_name, node = await self._group(compute)
        if standby is not None and standby.ref.get("placement_group") is None \
                and standby.ref.get("node_id") != node \
                and await self._move_next_to(compute, group_name, str(standby.ref["node_id"])):
            _group, group_name, node = await self._group(compute)
        if standby is not None and (standby.ref.get("node_id") != node
                                    or standby.ref.get("placement_group") not in
                                    (None, group_name)):
            # a standby runs where Ray put it, and the compute's bundle is elsewhere
            await self.stop_session(standby, reason="standby on another node than the compute")
            standby = None
        if standby is None:
            standby = await self.start_standby(env, idle_timeout_s=spec.idle_timeout_s,
                                               compute=compute)
        try:
            actor = self._actor(standby)
            if actor is None:
                raise SessionFailed("the standby session's actor is gone")
            flow_id = await self._ship(actor, Path(spec.flow_dir))
            session = {"idle_timeout": spec.idle_timeout_s, "workers": spec.workers,
                       "env": dict(spec.env_vars), "connections": dict(spec.connections)}
            limits = {"compute_id": compute.compute_id, "vcpu": compute.vcpu,
                      "memory_bytes": compute.memory_bytes}
            out = await self._get(actor.adopt.remote(env.recipe, flow_id, session, limits),
                                  BUILD_TIMEOUT_S)
            if not out.get("ok"):
                raise FlowSessionError.from_dict(out.get("error") or {})
            failed = self._adopt_failed(out.get("answer") or {},
                                        boundary.text(out.get("log_tail"), 20_000))
            if failed is not None:
                raise failed
        except Unreachable as exc:
            await self.stop_session(standby, reason="start failed")
            raise BuildFailed(f"the session's actor did not answer while starting: {exc}")
        except BaseException:
            await self.stop_session(standby, reason="start failed")
            raise
        detail = boundary.reason(out.get("limits_detail"))
        bundle = compute.limits.get("bundle") or {}
        return replace(standby, session_id=spec.session_id,
                       limits_detail=f"ray placement group {group_name} "
                                     f"({bundle.get('CPU', compute.vcpu):g} CPU); on its node: "
                                     f"{detail or 'no limits'}",
                       ref={**standby.ref, "placement_group": group_name})

    async def stop_session(self, handle: SessionHandle, *, reason: str = "") -> None:
        """Stop the supervisor, keep what it left (its runs' records, the end of its log),
        then end the actor. Idempotent: an actor that is gone has nothing left to give."""
        actor = self._actor(handle)
        if actor is None:
            return
        try:
            out = await self._get(actor.stop.remote(reason or "stopped"), 60.0)
        except (Unreachable, ActorGone):
            out = {}
        runs = out.get("runs") if isinstance(out.get("runs"), dict) else {}
        self._keep_salvage(handle, {str(k): [x for x in v if isinstance(x, bytes)]
                                    for k, v in runs.items() if isinstance(v, list)})
        log = out.get("log")
        self._keep_log(handle, log if isinstance(log, bytes) else None)
        await self._kill(handle.slot, actor)

    async def _kill(self, name: str, actor: Any) -> None:
        ray = self._ray()
        self._actors.pop(name, None)
        with contextlib.suppress(Exception):
            await asyncio.to_thread(ray.kill, actor, no_restart=True)

    async def status(self, handle: SessionHandle) -> BackendStatus:
        actor = self._actor(handle)
        if actor is None:
            return BackendStatus(BackendState.LOST, detail="the session's actor is gone "
                                 "(its node was lost, or it ended long ago)")
        try:
            seen = await self._get(actor.observe.remote(), CALL_S)
        except Unreachable as exc:
            return BackendStatus(BackendState.STARTING, detail=f"not answering: {exc}")
        except ActorGone as exc:
            return BackendStatus(BackendState.LOST, detail=f"the session's actor died: {exc}")
        if seen.get("running"):
            size = seen.get("log_size")
            return await self._live(handle, size if type(size) is int else 0)
        return self._ended(seen.get("exit") if isinstance(seen.get("exit"), dict) else None,
                           seen.get("failed") if isinstance(seen.get("failed"), dict) else {},
                           boundary.text(seen.get("last_line"), 1000, one_line=True))

    async def logs(self, handle: SessionHandle, *, tail_bytes: int = 256 * 1024) -> str:
        actor = self._actor(handle)
        if actor is not None:
            with contextlib.suppress(Unreachable, ActorGone):
                data = await self._get(actor.logs.remote(tail_bytes), CALL_S)
                if isinstance(data, bytes):
                    return boundary.text(data, tail_bytes)
        return self._kept_log(handle, tail_bytes)

    def alive(self, handle: SessionHandle) -> bool:
        """Does the session's supervisor run? (One call to its actor.)"""
        actor = self._actor(handle)
        if actor is None:
            return False
        try:
            return self._ray().get(actor.alive.remote(), timeout=5) is True
        except Exception:  # noqa: BLE001 - unreachable or dead: not alive
            return False

    def orphans(self, known: set[str]) -> list[SessionHandle]:
        """Our namespace's session actors that no record refers to (a control plane that
        died between starting one and recording it). One namespace per control plane."""
        from ray.util import list_named_actors

        ns = self.namespace
        found = []
        for entry in list_named_actors(all_namespaces=True):
            name, namespace = entry.get("name", ""), entry.get("namespace")
            # only the names start_standby makes ("fs-" and a slot id): nothing else is ours
            if namespace == ns and name.startswith(PREFIX) \
                    and SLOT_ID.match(name[len(PREFIX):]) and name not in known:
                found.append(SessionHandle(backend=self.name, session_id=name, slot=name,
                                           sandboxed=False, sandbox_detail="",
                                           limits_detail="", ref={"namespace": ns}))
        return found

    # --- the backend's part of SupervisorClient ------------------------------------------------

    async def _call(self, handle: SessionHandle, msg: dict[str, Any],
                    timeout: float) -> dict[str, Any]:
        actor = self._actor(handle)
        if actor is None:
            raise Unreachable("the session's actor is gone")
        try:
            answer = await self._get(actor.request.remote(msg, timeout), timeout + CALL_S)
        except ActorGone as exc:
            raise Unreachable(f"the session's actor died: {exc}") from None
        if not isinstance(answer, dict):
            raise Unreachable("the session's actor answered something that is not an object")
        if UNREACHABLE in answer:
            if answer.get(TOO_LONG) is True:
                raise AnswerTooLong(boundary.reason(answer[UNREACHABLE]))
            raise Unreachable(boundary.reason(answer[UNREACHABLE]))
        return answer

    async def _place_flow(self, handle: SessionHandle, snapshot: Path) -> str:
        actor = self._actor(handle)
        if actor is None:
            raise SessionFailed("the session's actor is gone", hint="reset the session")
        try:
            await self._ship(actor, snapshot)
            return str(await self._get(actor.place_flow.remote(snapshot.name, None), CALL_S))
        except (Unreachable, ActorGone) as exc:
            raise SessionFailed(f"the session's actor is not answering: {exc}",
                                hint="reset the session") from None

    async def _ship(self, actor: Any, snapshot: Path) -> str:
        """Send a snapshot to the actor's node unless it has it (content-addressed: its
        folder name is its id); its id."""
        flow_id = snapshot.name
        if await self._get(actor.place_flow.remote(flow_id, None), CALL_S) is None:
            data = await asyncio.to_thread(transfer.pack, snapshot)
            await self._get(actor.place_flow.remote(flow_id, data), 300.0)
        return flow_id

    # --- helpers -------------------------------------------------------------------------------

    async def close(self) -> None:
        """Disconnect this process from the cluster (sessions keep running)."""
        import ray

        self._actors.clear()
        if ray.is_initialized():
            await asyncio.to_thread(ray.shutdown)


class ActorGone(Exception):
    """The session's actor is dead (its node was lost, or it was killed)."""


def _died(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return boundary.reason(text[0] if text else type(exc).__name__)


def _image_only(env: EnvHandle) -> EnvRecipe:
    if env.recipe is None:
        raise InvalidInput("the ray backend builds environments on its nodes: it needs the "
                           "image's recipe")
    return replace(env.recipe, lock="", requirements=None, credentials={})


"""A session on a Ray node: ``SessionActor`` (wrapped with ``ray.remote`` by the Ray backend).

The actor runs in Ray's interpreter on its node and starts the unchanged supervisor
(``flowsession.worker.supervisor``) as its child, in the flow's environment built on this node,
under bubblewrap where the node has it (``backends.compute.slots``, as the local backend does).
It relays the supervisor's protocol over the node-local Unix socket and returns the answers
as data; the control plane validates them (``backends.compute.client``). Hostile flow code
runs in the supervisor's workers, never in a Ray worker (which holds a connection to the
whole cluster).

The supervisor dies with its actor: it is started from a thread that lives as long as the
actor (``Launcher``), with ``PR_SET_PDEATHSIG`` and bubblewrap's ``--die-with-parent``, so a
lost raylet (which takes its workers with it) takes the session too.

When the supervisor ends by itself (its idle timeout), the actor keeps what it left (exit
reason, records, log) and answers ``observe`` with it until the control plane stops it, or for
``linger_s`` at most; then it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flowsession.backends.compute import boundary, procs, sandbox, transfer
from flowsession.backends.compute.base import EnvRecipe
from flowsession.backends.compute.limits import Limits, LimitsError
from flowsession.backends.compute.slots import RUN_ID, SLOT_ID, Launched, Slot
from flowsession.errors import FlowSessionError
from flowsession.node.environments import NodeEnvironments, node_settings
from flowsession.worker import protocol

UNREACHABLE = "_unreachable"  # the key of a relayed request that got no answer
TOO_LONG = "_too_long"  # ... because its answer was longer than the request's can be
OWNER = "owner.json"  # in the slot's control dir: the actor that runs it (the node's sweep)
LINGER_S = 3600.0  # an ended session's actor answers for this long, then exits
STARTUP_TIMEOUT_S = 180.0


class Launcher:
    """A thread that lives as long as the actor: processes started from it die with the
    actor (PR_SET_PDEATHSIG fires when the forking *thread* ends, and actor methods run on
    pool threads that come and go)."""

    def __init__(self) -> None:
        self._jobs: queue.Queue = queue.Queue()
        threading.Thread(target=self._serve, name="flowsession-launcher", daemon=True).start()

    def _serve(self) -> None:
        while True:
            fn, done = self._jobs.get()
            try:
                done.put((True, fn()))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                done.put((False, exc))

    def run(self, fn: Callable[[], Any]) -> Any:
        done: queue.Queue = queue.Queue(maxsize=1)
        self._jobs.put((fn, done))
        ok, value = done.get()
        if not ok:
            raise value
        return value


class SessionActor:
    def __init__(self, config: dict[str, Any] | None = None):
        config = config or {}
        self.settings = node_settings()
        self.envs = NodeEnvironments(self.settings)
        self.runtime = self.settings.runtime_dir
        self.bwrap = sandbox.bwrap_path()
        self.linger_s = float(config.get("linger_s", LINGER_S))
        self.namespace = config.get("namespace")
        self.launcher = Launcher()
        self.lock = threading.RLock()
        self.slot: Slot | None = None
        self.launched: Launched | None = None
        self.env: dict[str, Any] = {}  # the environment it runs: {"id", "holder"}
        self.ended_at: float | None = None
        self.stopping = False
        self.image_recipe: EnvRecipe | None = None
        self.recipe: EnvRecipe | None = None  # the session's environment (helpers build it)
        self.session: dict[str, Any] = {}  # the adopt's settings (helpers adopt the same)
        self.flow_id: str | None = None
        self.compute: dict[str, Any] = {}  # {"compute_id", "vcpu", "memory_bytes"}
        self.limits_handle: dict[str, Any] | None = None
        self._runs = None  # node.runs.RunPlans, made on the first run

    # --- starting ----------------------------------------------------------------------------

    def launch(self, recipe: EnvRecipe, idle_timeout_s: float) -> dict[str, Any]:
        """Build (or adopt) the image here and spawn the supervisor in standby with its
        interpreter; returns at once (it imports the runtime meanwhile)."""
        try:
            self._sweep()
            _layers, python = asyncio.run(self.envs.image(recipe))
            self.image_recipe = recipe
            slot = Slot.new(self.runtime)
            launched = self.launcher.run(lambda: slot.launch(
                python, self.envs.read_only_paths, idle_timeout_s=idle_timeout_s,
                bwrap=self.bwrap, hidden=[str(self.settings.db_url.removeprefix("sqlite:///")),
                                          str(self.settings.secret_key_file)],
                die_with_parent=True))
        except Exception as exc:  # noqa: BLE001 - the caller gets the reason as data
            return {"ok": False, "error": _error(exc)}
        with self.lock:
            self.slot, self.launched = slot, launched
        protocol.write_json(slot.control / OWNER, {"actor": procs.identity(),
                                                   "slot": slot.id})
        threading.Thread(target=self._watch, name="flowsession-watch", daemon=True).start()
        return {"ok": True, "slot": slot.id, "pid": launched.pid,
                "pid_start": launched.pid_start, "node_id": self.node_id(),
                "sandboxed": self.bwrap is not None,
                "sandbox_detail": sandbox.describe(self.bwrap is not None)}

    def adopt(self, recipe: EnvRecipe, flow_id: str, session: dict[str, Any],
              compute: dict[str, Any]) -> dict[str, Any]:
        """Build the flow's environment here, put the session under its compute's limits,
        and have the standby adopt the flow (placed with ``place_flow`` first). Returns the
        supervisor's answer (``answer``) and what a failure needs (``log_tail``)."""
        slot, launched = self._require()
        holder = f"slot:{slot.id}"
        try:
            env = asyncio.run(self.envs.environment(recipe, holder=holder))
        except Exception as exc:  # noqa: BLE001 - the caller gets the reason as data
            return {"ok": False, "error": _error(exc)}
        with self.lock:
            if self.env.get("id") and self.env["id"] != env.id:
                self.envs.release(self.env["id"], holder)
            self.env = {"id": env.id, "holder": holder}
            self.recipe, self.flow_id = recipe, flow_id
            self.session, self.compute = dict(session), dict(compute)
        protocol.write_json(slot.control / OWNER, {"actor": procs.identity(), "slot": slot.id,
                                                   "env": self.env})
        try:
            limits_detail = self._join_limits(launched)
        except LimitsError as exc:
            return {"ok": False, "error": {"code": "session_failed", "message": str(exc)}}
        flow = self._flow_inside(flow_id)
        if flow is None:
            return {"ok": False, "error": {"code": "session_failed",
                                           "message": f"snapshot {flow_id} is not on this node"}}
        # the environment's own packages, linked into the slot: the node's environments
        # folder is never bound whole (another user's private packages stay his)
        site = sorted(str(p) for p in Path(env.path).glob("lib/python*/site-packages"))
        try:
            sites = slot.place_env(env.id, site, sandboxed=self.bwrap is not None)
        except (OSError, ValueError) as exc:
            return {"ok": False, "error": _error(exc)}
        answer = self._wait_for_standby()
        if answer is None:
            answer = self._relay({
                "op": "adopt", "flow": flow, "site_dirs": sites,
                "idle_timeout": session.get("idle_timeout", 0),
                "workers": session.get("workers", 1), "env": session.get("env") or {},
                "connections": session.get("connections") or {}}, STARTUP_TIMEOUT_S)
        return {"ok": True, "answer": answer, "limits_detail": limits_detail,
                "log_tail": slot.log_lines(20) if answer.get("ok") is not True else ""}

    def _wait_for_standby(self) -> dict[str, Any] | None:
        """None once the supervisor waits in standby; else the answer that says why not."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if not self._running():
                return {"ok": False, "error": {"message": "the session's supervisor exited "
                                               "while starting: " + self.slot.log_lines(5)}}
            ping = self._relay({"op": "ping"}, 5)
            if ping.get("phase") == protocol.Phase.STANDBY:
                return None
            if ping.get("phase") == protocol.Phase.FAILED:
                return {"ok": False, "error": {"message": "the session failed to start: "
                                               f"{boundary.reason(ping.get('error'))}"}}
            if time.monotonic() > deadline:
                return {"ok": False, "error": {"message": "the session did not start within "
                                               f"{STARTUP_TIMEOUT_S:.0f} s"}}
            time.sleep(0.01)

    def place_flow(self, flow_id: str, data: bytes | None = None) -> str | None:
        """The snapshot ``flow_id`` in the session's slot (read-only inside); None when this
        node does not have it yet (send ``data``, ``transfer.pack``'s bytes). The node keeps
        one copy of each snapshot, shared by its sessions."""
        if not RUN_ID.match(flow_id):
            raise ValueError(f"{flow_id!r} is not a snapshot id")
        stored = self.settings.snapshots_dir / flow_id
        if not stored.is_dir():
            if data is None:
                return None
            transfer.unpack(data, stored)
        return self._flow_inside(flow_id)

    def snapshot_data(self, flow_id: str) -> bytes:
        """A snapshot this node has, packed (for a helper on another node)."""
        return transfer.pack(self.settings.snapshots_dir / flow_id)

    def _flow_inside(self, flow_id: str) -> str | None:
        stored = self.settings.snapshots_dir / flow_id
        if self.slot is None or not stored.is_dir():
            return None
        return self.slot.place_flow(stored, sandboxed=self.bwrap is not None)

    def _join_limits(self, launched: Launched) -> str:
        """The compute's limits on this node (cgroups where the node allows, else rlimits),
        for the supervisor and what it forks later. Ray's placement group only books them."""
        if not self.compute.get("vcpu"):
            return ""
        limits = Limits()
        handle = limits.create(str(self.compute["compute_id"]), float(self.compute["vcpu"]),
                               int(self.compute["memory_bytes"]))
        for pid in [launched.pid, *procs.tree(launched.pid)]:
            with contextlib.suppress(ProcessLookupError):
                limits.add_process(handle, pid)
        self.limits_handle = handle
        return Limits.describe(handle)

    # --- the protocol, relayed -------------------------------------------------------------------

    def request(self, msg: dict[str, Any], timeout: float) -> dict[str, Any]:
        """One protocol request, answered as data; a run's requests go through its plan (its
        lines may be spread over helper actors, ``node.runs``)."""
        if msg.get("op") in ("run", "run_status", "run_cancel", "run_forget", "collect"):
            return self.runs.request(msg, timeout)
        return self._relay(msg, timeout)

    def _relay(self, msg: dict[str, Any], timeout: float) -> dict[str, Any]:
        if self.launched is None:
            return {UNREACHABLE: "the session has no supervisor"}
        try:  # the answer bounded by the request's kind (protocol.MAX_ANSWER)
            return protocol.request(self.launched.socket, msg, timeout)
        except protocol.AnswerTooLong as exc:
            return {UNREACHABLE: str(exc), TOO_LONG: True}
        except (OSError, protocol.ProtocolError) as exc:
            return {UNREACHABLE: str(exc) or type(exc).__name__}

    @property
    def runs(self):
        if self._runs is None:
            from flowsession.node.runs import RunPlans

            self._runs = RunPlans(self)
        return self._runs

    # --- what the control plane reads ----------------------------------------------------------

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def info(self) -> dict[str, Any]:
        return {"node_id": self.node_id(), "actor_pid": os.getpid(),
                "pid": self.launched.pid if self.launched else None,
                "slot": self.slot.id if self.slot else None}

    def alive(self) -> bool:
        """Does the session's supervisor run?"""
        return self._running()

    def _running(self) -> bool:
        launched = self.launched
        return launched is not None and procs.alive(launched.pid, launched.pid_start)

    def observe(self) -> dict[str, Any]:
        """What the control plane needs for a status: does the supervisor run, how big is its
        log; once it is gone, what it left (exit.json, status.json: data, bounded)."""
        if self.slot is None:
            return {"running": False, "exit": None, "failed": {},
                    "last_line": "the session never started", "log_size": 0}
        if self._running():
            return {"running": True, "log_size": self.slot.log_size()}
        exit_info, failed = self.slot.ended()
        return {"running": False, "exit": exit_info, "failed": failed,
                "last_line": self.slot.log_lines(1), "log_size": self.slot.log_size()}

    def logs(self, tail_bytes: int) -> bytes | None:
        return self.slot.log_tail(tail_bytes=tail_bytes) if self.slot else None

    # --- ending --------------------------------------------------------------------------------

    def stop(self, reason: str) -> dict[str, Any]:
        """Stop the supervisor (and the run helpers); hand over what it left -- its runs'
        records, the end of its log -- as data; clean the slot. The caller then kills the
        actor."""
        with self.lock:
            self.stopping = True
        helpers = self._runs.close() if self._runs is not None else {}
        out: dict[str, Any] = {"runs": helpers, "log": None}
        slot, launched = self.slot, self.launched
        if slot is None or launched is None:
            return out
        slot.stop(launched, reason=reason or "stopped")
        for run_id, records in slot.salvage().items():
            out["runs"].setdefault(run_id, []).extend(records)
        out["log"] = slot.log_tail(tail_bytes=1 << 20)
        self._leave(slot)
        return out

    def _leave(self, slot: Slot) -> None:
        """Release what this session held on the node: its environment, its limits group
        (when no other session of the compute uses it), its folders."""
        if self.env.get("id"):
            with contextlib.suppress(Exception):
                self.envs.release(self.env["id"], self.env["holder"])
        if self.limits_handle is not None:
            limits = Limits(self.limits_handle["mode"])
            with contextlib.suppress(LimitsError, OSError):
                if not limits.processes(self.limits_handle):
                    limits.destroy(self.limits_handle)
        slot.remove()

    def _watch(self) -> None:
        """Wait for the supervisor to end; an actor whose session ended by itself answers
        for ``linger_s``, then exits."""
        launched = self.launched
        if launched is None or launched.proc is None:
            return
        launched.proc.wait()
        with self.lock:
            self.ended_at = time.monotonic()
            if self.stopping:
                return
        deadline = time.monotonic() + self.linger_s
        while time.monotonic() < deadline:
            time.sleep(1.0)
            if self.stopping:
                return
        self._exit()

    def _exit(self) -> None:
        import ray

        with contextlib.suppress(Exception):
            ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    def _sweep(self) -> None:
        """Slots of this node whose actor is gone (lost with a raylet): their processes died
        with it; remove their folders and release what they held."""
        control = self.runtime / "control"
        if not control.is_dir():
            return
        for entry in control.iterdir():
            if not SLOT_ID.match(entry.name):  # only the slots Slot.new makes
                continue
            owner = protocol.read_json(entry / OWNER)  # the launcher's own file
            if not isinstance(owner, dict) or procs.identity_alive(str(owner.get("actor"))):
                continue
            env = owner.get("env") if isinstance(owner.get("env"), dict) else {}
            if env.get("id"):
                with contextlib.suppress(Exception):
                    self.envs.release(str(env["id"]), str(env.get("holder")))
            slot_dir = self.runtime / "slots" / entry.name
            for pid in procs.with_argument_under(str(slot_dir) + "/"):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            shutil.rmtree(slot_dir, ignore_errors=True)
            shutil.rmtree(entry, ignore_errors=True)

    def _require(self) -> tuple[Slot, Launched]:
        if self.slot is None or self.launched is None:
            raise RuntimeError("the session's supervisor was not launched")
        return self.slot, self.launched



def _error(exc: Exception) -> dict[str, Any]:
    """An error as data for the control plane (``FlowSessionError.from_dict``)."""
    if isinstance(exc, FlowSessionError):
        return {**exc.to_dict(), "code": exc.code}
    return {"code": "build_failed", "message": f"on the session's node: "
            f"{type(exc).__name__}: {exc}"[:2000],
            "hint": "see the node's log (FLOWSESSION_NODE_HOME/logs)"}


_REMOTE: Any = None


def remote_class() -> Any:
    """``SessionActor`` as a Ray actor class (made once per process)."""
    global _REMOTE
    if _REMOTE is None:
        import ray

        _REMOTE = ray.remote(SessionActor)
    return _REMOTE

"""A run's lines on a Ray session, spread over more than one node when it asks for more
workers than the session's compute has vCPUs.

The session's own supervisor (part ``main``) runs up to ``ceil(vCPU)`` of the run's workers.
Each further ``ceil(vCPU)`` go to a *helper*: another ``SessionActor`` with its own supervisor,
in the same environment (built on its node from the same recipe), loaded with the same flow,
in a bundle of the compute's VM size. The helpers' bundles are one placement group, placed by
Ray with ``SPREAD`` (other nodes when the cluster has them, or its autoscaler adds them). The
group and the helpers are this actor's (not detached): they die with it. When the group cannot
be placed within ``HELPER_WAIT_S``, every worker runs on the session's own supervisor, as the
local backend runs them; so do the workers of a helper that has not started within
``HELPER_BUDGET_S`` (the run's submission waits for them). The lines are dealt to the parts in proportion to their workers;
each part runs its share as an ordinary run of its supervisor.

To the control plane the run stays one run of one session: ``run_status`` sums the parts,
``collect`` brings every part's records (cursor keys ``<helper>|<key>``), ``run_cancel`` and
``run_forget`` go to all of them. A helper whose share has ended and whose records were all
handed over is stopped at once, freeing its bundle. A helper that is lost (its node died, its
supervisor crashed) counts as ended with what it gave: when the other parts end, the run
answers ``completed`` with fewer lines done than it has, and the control plane submits the
lines that have no stored result again -- each line is stored once, whichever part ran it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flowsession.backends.compute import boundary
from flowsession.worker.protocol import RunState

if TYPE_CHECKING:
    from flowsession.node.actor import SessionActor

log = logging.getLogger("flowsession.node")

HELPER_WAIT_S = 30.0  # for the helpers' placement group
HELPER_BUDGET_S = 75.0  # placing and starting the helpers, in all (a run's submission waits)
CALL_S = 30.0  # a request to a helper, beyond its own timeout
ACTIVE = frozenset({RunState.LOADING, RunState.RUNNING})


@dataclass
class Part:
    name: str  # "main", or the helper's slot id
    actor: Any = None  # None: the session's own supervisor
    workers: int = 1
    status: dict[str, Any] | None = None  # the last run status it gave
    lost: str | None = None  # why it is gone
    drained: bool = False  # ended, and every record handed over: stopped


@dataclass
class Plan:
    run_id: str
    parts: list[Part]
    group: Any = None  # the helpers' placement group


class RunPlans:
    def __init__(self, actor: SessionActor):
        self.actor = actor
        self.plans: dict[str, Plan] = {}
        self.lock = threading.RLock()

    # --- requests ---------------------------------------------------------------------------

    def request(self, msg: dict[str, Any], timeout: float) -> dict[str, Any]:
        op, run_id = msg.get("op"), str(msg.get("id"))
        with self.lock:
            if op == "run":
                return self._run(msg, timeout)
            plan = self.plans.get(run_id)
            if plan is None:  # a run on the session's own supervisor alone
                return self.actor._relay(msg, timeout)
            if op == "run_status":
                self._refresh(plan)
                return {"ok": True, "run": self._merged(plan)}
            if op == "collect":
                return self._collect(plan, msg, timeout)
            if op == "run_cancel":
                for part in self._live(plan):
                    part.status = self._ask(part, msg, timeout).get("run") or part.status
                return {"ok": True, "run": self._merged(plan)}
            # run_forget: the control plane stored the run
            answer = self.actor._relay(msg, timeout)
            self._close(plan)
            del self.plans[run_id]
            return answer

    def close(self) -> dict[str, list[bytes]]:
        """The session stops: its helpers and their bundles go; the records they wrote and
        did not hand over yet are returned (with the session's own, the control plane keeps
        them)."""
        left: dict[str, list[bytes]] = {}
        with self.lock:
            for plan in self.plans.values():
                for run_id, records in self._close(plan).items():
                    left.setdefault(run_id, []).extend(records)
            self.plans.clear()
        return left

    # --- submitting ---------------------------------------------------------------------------

    def _run(self, msg: dict[str, Any], timeout: float) -> dict[str, Any]:
        run_id = str(msg.get("id"))
        plan = self.plans.get(run_id)
        if plan is not None:
            self._refresh(plan)
            merged = self._merged(plan)
            if merged["state"] in ACTIVE:  # a run already going answers its status
                return {"ok": True, "run": merged}
            self._close(plan)  # ended: a new submission makes a new plan
            del self.plans[run_id]
        workers = max(1, int(msg.get("workers") or 1))
        compute = self.actor.compute
        cap = max(1, math.ceil(float(compute.get("vcpu") or 0)))
        if not compute.get("vcpu") or workers <= cap:
            return self.actor._relay(msg, timeout)
        shares = [cap] + [min(cap, workers - cap * i) for i in range(1, math.ceil(workers / cap))]
        group, helpers = self._helpers(len(shares) - 1, msg)
        if not helpers:  # no room, or none started: every worker on the session's supervisor
            return self.actor._relay(msg, timeout)
        parts = [Part("main", None, shares[0] + sum(shares[1 + len(helpers):]))]
        parts += [Part(name, actor, share) for (name, actor), share in zip(helpers, shares[1:])]
        plan = Plan(run_id, parts, group)
        lines = msg.get("lines")
        if lines is None:
            lines = list(range(str(msg.get("inputs") or "").count("\n")))
        deck = [i for i, part in enumerate(parts) for _ in range(part.workers)]
        shard: list[list[int]] = [[] for _ in parts]
        for n, pos in enumerate(lines):
            shard[deck[n % len(deck)]].append(pos)
        for part, mine in zip(parts, shard):
            sub = {**msg, "lines": mine, "workers": part.workers}
            if part.actor is not None and msg.get("flow"):
                sub["flow"] = self._helper_flow(part, str(msg["flow"]).rstrip("/")
                                                .rsplit("/", 1)[-1])
            answer = self._ask(part, sub, timeout)
            if answer.get("ok") is not True and part.actor is None:
                self._close(plan)
                return answer  # the session itself refused the run: say why
            part.status = answer.get("run")
        self.plans[run_id] = plan
        log.info("run %s: %d line(s) over %d part(s): %s", run_id, len(lines), len(parts),
                 ", ".join(f"{p.name} {len(s)} line(s) on {p.workers} worker(s)"
                           for p, s in zip(parts, shard)))
        return {"ok": True, "run": self._merged(plan)}

    def _helpers(self, n: int, msg: dict[str, Any]) -> tuple[Any, list[tuple[str, Any]]]:
        """``n`` helper actors, each in a bundle of the compute's size, started with the
        session's environment and flow; fewer when some cannot start."""
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from flowsession.node.actor import remote_class

        a, compute = self.actor, self.actor.compute
        deadline = time.monotonic() + HELPER_BUDGET_S
        bundle = {"CPU": float(compute["vcpu"]), "memory": int(compute["memory_bytes"])}
        group = placement_group([dict(bundle) for _ in range(n)], strategy="SPREAD")
        if not group.wait(timeout_seconds=HELPER_WAIT_S):
            log.warning("no room for %d helper(s) of %s within %.0f s: the run's workers all "
                        "run on the session's own supervisor", n, bundle, HELPER_WAIT_S)
            remove_placement_group(group)
            return None, []
        cls = remote_class()
        actors = [cls.options(num_cpus=0, max_concurrency=64, max_restarts=0,
                              scheduling_strategy=PlacementGroupSchedulingStrategy(
                                  placement_group=group, placement_group_bundle_index=i)
                              ).remote({"linger_s": a.linger_s}) for i in range(n)]
        idle = float(a.session.get("idle_timeout") or 0)
        flows = sorted({a.flow_id} | ({str(msg["flow"]).rstrip("/").rsplit("/", 1)[-1]}
                                      if msg.get("flow") else set()))

        def start(h: Any) -> dict[str, Any]:
            """A helper's whole start, as one chain of calls (its image, the flows it does
            not have, its environment and the session's flow adopted)."""
            answer = ray.get(h.launch.remote(a.image_recipe, idle), timeout=_left(deadline))
            if not answer.get("ok"):
                return answer
            for fid in flows:
                if ray.get(h.place_flow.remote(fid, None), timeout=_left(deadline)) is None:
                    ray.get(h.place_flow.remote(fid, a.snapshot_data(fid)),
                            timeout=_left(deadline))
            adopted = ray.get(h.adopt.remote(a.recipe, a.flow_id, {**a.session, "workers": 1},
                                             dict(compute)), timeout=_left(deadline))
            if not (adopted.get("ok") and (adopted.get("answer") or {}).get("ok")):
                return {"ok": False, "error": adopted.get("error") or adopted.get("answer")}
            return answer

        helpers = []
        with ThreadPoolExecutor(max_workers=n) as pool:
            for h, fut in [(h, pool.submit(start, h)) for h in actors]:
                try:
                    answer = fut.result()
                except Exception as exc:  # noqa: BLE001 - a helper that fails is left out
                    answer = {"ok": False, "error": repr(exc)}
                if answer.get("ok"):
                    helpers.append((str(answer["slot"]), h))
                else:
                    log.warning("a run helper did not start: %s", answer.get("error"))
                    with _quiet():
                        ray.kill(h, no_restart=True)
        if not helpers:
            remove_placement_group(group)
            return None, []
        return group, helpers

    def _helper_flow(self, part: Part, flow_id: str) -> str:
        import ray

        path = ray.get(part.actor.place_flow.remote(flow_id, None), timeout=CALL_S)
        return str(path)

    # --- following ----------------------------------------------------------------------------

    def _ask(self, part: Part, msg: dict[str, Any], timeout: float) -> dict[str, Any]:
        """A request to one part; a helper that cannot answer any more is marked lost."""
        from flowsession.node.actor import UNREACHABLE

        if part.actor is None:
            return self.actor._relay(msg, timeout)
        import ray
        from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

        try:
            answer = ray.get(part.actor.request.remote(msg, timeout), timeout=timeout + CALL_S)
        except (ActorUnavailableError, GetTimeoutError) as exc:  # perhaps back soon
            return {UNREACHABLE: str(exc)[:300]}
        except RayActorError as exc:  # died (its node, or its process)
            part.lost = part.lost or f"its actor died ({type(exc).__name__})"
            return {UNREACHABLE: str(exc)[:300]}
        if UNREACHABLE in answer and not part.drained:
            part.lost = part.lost or f"its supervisor is gone: {answer[UNREACHABLE]}"
        return answer

    def _live(self, plan: Plan) -> list[Part]:
        return [p for p in plan.parts if p.lost is None and not p.drained]

    def _refresh(self, plan: Plan) -> None:
        for part in self._live(plan):
            answer = self._ask(part, {"op": "run_status", "id": plan.run_id}, 10.0)
            if isinstance(answer.get("run"), dict):
                part.status = answer["run"]
            elif answer.get("ok") is True and part.actor is None:
                part.status = None  # the session's supervisor no longer knows the run
        for part in plan.parts:
            if part.lost and not part.drained:
                log.warning("run %s: helper %s was lost (%s): its lines without a record run "
                            "again when the rest ends", plan.run_id, part.name, part.lost)
                part.drained = True  # nothing more will come from it

    def _merged(self, plan: Plan) -> dict[str, Any]:
        """One run status of the parts' (the control plane checks every field)."""
        states, total, done, failed, workers, restarts = [], 0, 0, 0, 0, 0
        errors: list[Any] = []
        error = None
        for part in plan.parts:
            st = boundary.run_progress(part.status) or {"state": RunState.COMPLETED, "total": 0,
                                                        "done": 0, "failed": 0, "workers": 0,
                                                        "restarts": 0, "errors": []}
            if part.actor is None and part.status is None:
                st = {**st, "state": RunState.FAILED,
                      "error": "the session's supervisor no longer knows the run"}
            state = RunState.COMPLETED if part.lost and st["state"] in ACTIVE else st["state"]
            states.append(state)
            total += st["total"]
            done += st["done"]
            failed += st["failed"]
            workers += 0 if part.lost or part.drained else st["workers"]
            restarts += st["restarts"] + (1 if part.lost else 0)
            errors += st["errors"]
            if state == RunState.FAILED and error is None:
                error = st.get("error") or f"part {part.name} failed"
        if RunState.FAILED in states:
            state = RunState.FAILED
        elif any(s in ACTIVE for s in states):
            state = (RunState.LOADING if all(s == RunState.LOADING for s in states)
                     else RunState.RUNNING)
        elif RunState.CANCELED in states:
            state = RunState.CANCELED
        else:
            state = RunState.COMPLETED
        return {"id": plan.run_id, "state": state, "total": total, "done": done,
                "failed": failed, "workers": workers, "restarts": restarts,
                "errors": errors[:10], "error": error,
                "parts": [{"name": p.name, "workers": p.workers, "lost": p.lost}
                          for p in plan.parts]}

    # --- collecting ---------------------------------------------------------------------------

    def _collect(self, plan: Plan, msg: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Every part's records and logs past the cursor, within ``max_bytes`` in all."""
        cursor = msg.get("cursor") if isinstance(msg.get("cursor"), dict) else {}
        budget = int(msg.get("max_bytes") or boundary.MAX_COLLECT)
        records: list[Any] = []
        logs: dict[str, Any] = {}
        new_cursor: dict[str, Any] = {}
        more = False
        for part in plan.parts:
            prefix = "" if part.actor is None else f"{part.name}|"
            mine = {k[len(prefix):]: v for k, v in cursor.items()
                    if (k.startswith(prefix) if prefix else "|" not in k)}
            new_cursor.update({prefix + k: v for k, v in mine.items()})
            if part.drained or part.lost:
                continue
            if budget <= 0:
                more = True
                continue
            answer = self._ask(part, {**msg, "cursor": mine, "max_bytes": budget}, timeout)
            if answer.get("ok") is not True:
                continue
            got = answer.get("records") if isinstance(answer.get("records"), list) else []
            records += got
            budget -= sum(len(r) for r in got if isinstance(r, str))
            for k, v in (answer.get("logs") or {}).items():
                logs[f"{part.name}-{k}" if prefix else k] = v
            for k, v in (answer.get("cursor") or {}).items():
                new_cursor[prefix + str(k)] = v
            if answer.get("more") is True:
                more = True
            elif part.actor is not None and (part.status or {}).get("state") not in ACTIVE \
                    and part.status is not None:
                self._drain(part)  # ended, and everything it had is in this answer
        if all(p.drained or p.lost for p in plan.parts if p.actor is not None) \
                and plan.group is not None:
            self._remove_group(plan)
        return {"ok": True, "records": records, "logs": logs, "cursor": new_cursor,
                "more": more}

    # --- ending -------------------------------------------------------------------------------

    def _drain(self, part: Part, reason: str = "its share of the run is done"
               ) -> dict[str, list[bytes]]:
        """Stop a helper; what its runs wrote (records), as its stop handed it over."""
        import ray

        part.drained = True
        out: dict[str, Any] = {}
        with _quiet():
            out = ray.get(part.actor.stop.remote(reason), timeout=CALL_S + 60)
        with _quiet():
            ray.kill(part.actor, no_restart=True)
        runs = out.get("runs") if isinstance(out, dict) else None
        return runs if isinstance(runs, dict) else {}

    def _close(self, plan: Plan) -> dict[str, list[bytes]]:
        left: dict[str, list[bytes]] = {}
        for part in plan.parts:
            if part.actor is not None and not part.drained:
                for run_id, records in self._drain(part, "the run's session stops").items():
                    left.setdefault(run_id, []).extend(records)
        self._remove_group(plan)
        return left

    @staticmethod
    def _remove_group(plan: Plan) -> None:
        if plan.group is None:
            return
        from ray.util.placement_group import remove_placement_group

        with _quiet():
            remove_placement_group(plan.group)
        plan.group = None


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the run's helpers did not start in time")
    return left


class _quiet:
    """Ignore what a helper that is already gone raises."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is not None and isinstance(exc, Exception):
            log.debug("ignored: %r", exc)
            return True
        return False

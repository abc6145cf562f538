"""Which limit held: a worker killed by SIGKILL (or failing with MemoryError) is told apart
from one killed for another reason by asking the compute's limits, never the session (whose
words are untrusted data). ``session show``'s reason, its events and a test line's error then
say "the memory limit of its VM size small (2.0 GB) held", not just "killed by SIGKILL"."""

from __future__ import annotations

import logging
import re
from typing import Any

from flowsession.backends.compute.limits import Limits
from flowsession.config import format_size

log = logging.getLogger(__name__)

_KILLED = re.compile(r"worker (\d+) was killed by SIGKILL")
_MAX_SAID = 1000  # deaths remembered (so the same death reads the same in every place)


class LimitWatch:
    """One per session service: remembers the OOM kills already attributed per compute."""

    def __init__(self, computes: Any) -> None:
        self.computes = computes
        self.seen: dict[str, int] = {}  # compute id -> oom_kill count already attributed
        self.said: dict[str, str] = {}  # "compute:pid" -> the sentence said about that death

    def explain(self, session: Any, message: str) -> str:
        """``message`` with the limit that held appended, when the compute's limits say one
        did; else ``message`` unchanged (never raises: this only adds to an error)."""
        killed = _KILLED.search(message or "")
        if killed is None and "MemoryError" not in (message or ""):
            return message
        try:
            return self._explain(session, message, killed)
        except Exception:  # an explanation must not hide the error itself
            log.debug("cannot tell which limit held for %s", session.id, exc_info=True)
            return message

    def _explain(self, session: Any, message: str, killed: re.Match | None) -> str:
        compute = self.computes.get(session.compute_id, user=session.owner)
        handle = compute.compute_handle
        limits = dict(handle.limits) if handle is not None else {}
        size = f"VM size {compute.vm_size} ({format_size(compute.memory_bytes)})"
        if killed is not None and limits.get("mode") in ("cgroup1", "cgroup2"):
            key = f"{compute.id}:{killed.group(1)}"
            if key not in self.said:
                kills = Limits.memory_kills(limits)
                if kills is None or kills <= self.seen.get(compute.id, 0):
                    return message
                self.seen[compute.id] = kills
                if len(self.said) >= _MAX_SAID:
                    self.said.pop(next(iter(self.said)))
                self.said[key] = (f"the memory limit of its {size} held: the kernel's OOM "
                                  f"killer stopped it (compute {compute.id}, oom_kill={kills})")
            return f"{message} -- {self.said[key]}"
        if killed is None and limits.get("mode") == "rlimit":
            cap = limits.get("address_space_bytes") or compute.memory_bytes
            return (f"{message} -- the memory limit of its {size} held "
                    f"(address space {format_size(cap)} per process, RLIMIT_AS)")
        return message

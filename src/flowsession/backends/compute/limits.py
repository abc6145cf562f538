"""Hold a compute's processes to its VM size (vCPU, memory).

A compute's sessions (a supervisor that forks workers) all go into one group per compute, so the
VM size caps the compute as a whole, not each process. Three ways, best first:

- ``cgroup2``: one group ``/sys/fs/cgroup/flowsession/<compute_id>`` with ``cpu.max``,
  ``memory.max`` and ``memory.swap.max=0`` (controllers enabled in the parents as needed).
- ``cgroup1``: one group ``flowsession/<compute_id>`` under each controller mount (memory, cpu,
  cpuacct and pids when mounted): ``cpu.cfs_quota_us``/``cpu.cfs_period_us`` and
  ``memory.limit_in_bytes`` (plus ``memory.memsw.limit_in_bytes``, so swap cannot stretch it).

Either cgroup mode also caps the compute's processes and threads (``pids.max``, where the pids
controller is there): flow code is hostile, and a fork bomb within its memory would otherwise
take every pid of the host (``kernel.pid_max``) from the server and everyone else's sessions.
- ``rlimit``: no cgroup access (not root, read-only cgroupfs): ``RLIMIT_AS`` per process. This
  is much weaker: it caps *address space*, not memory in use, each process on its own, and it
  cannot limit CPU at all. ``describe()`` says so, so users are not misled.

The handle is a JSON-serialisable dict kept in ``ComputeHandle.limits``: a control plane that
restarts can list, kill and remove the groups from it alone. Stdlib only (control plane code).
"""

from __future__ import annotations

import os
import re
import resource
import signal
import time
import uuid
from pathlib import Path
from typing import Any

from flowsession.config import format_size

CGROUP_ROOT = Path("/sys/fs/cgroup")
PARENT = "flowsession"
MODES = ("cgroup2", "cgroup1", "rlimit")
PERIOD_US = 100_000
# RLIMIT_AS counts reserved address space, not memory used: CPython maps more than it touches,
# every thread reserves a stack (8 MB) and glibc a malloc arena (64 MB). A small VM size taken
# literally would stop Python from starting or from creating threads, so the address-space cap
# is never below this floor (and small sizes are therefore held only loosely in rlimit mode).
RLIMIT_AS_FLOOR = 1 << 30
_V1_WANTED = {"memory", "cpu", "cpuacct", "pids"}
PIDS_PER_VCPU, PIDS_FLOOR = 1024, 2048  # processes + threads of a compute (pids.max)
_V2_WANTED = ("cpu", "memory", "pids")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# Joins the groups given as cgroup.procs paths, then becomes the command: nothing it forks can
# start outside the groups (add_process after Popen races with the command's first forks).
_JOIN = ('n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 125; shift; '
         'n=$((n-1)); done; exec "$@"')
_ULIMIT = 'ulimit -v "$1" || exit 125; shift; exec "$@"'


class LimitsError(RuntimeError):
    """A group could not be created, limited, joined or removed (the message says which file)."""


def _write(path: Path, value: str) -> None:
    # O_WRONLY without O_CREAT: a control file that the kernel did not create is an error.
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _v1_mounts(root: Path) -> dict[str, Path]:
    """Controller -> mount dir for cgroup v1 (``cpu`` and ``cpuacct`` may share one mount)."""
    found: dict[str, Path] = {}
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return found
    for entry in entries:
        if not (entry / "cgroup.procs").is_file():
            continue
        for ctl in set(entry.resolve().name.split(",")) & _V1_WANTED:
            found.setdefault(ctl, entry.resolve())
    return found


def _pids(vcpu: float) -> int:
    """The processes and threads a compute of ``vcpu`` may have at once."""
    return max(PIDS_FLOOR, int(vcpu * PIDS_PER_VCPU))


def _enable_v2(root: Path, parent: Path) -> None:
    """Enable cpu, memory, pids for the children of ``root`` and of ``parent`` (best effort)."""
    for node in (root, parent):
        available = (_read(node / "cgroup.controllers") or "").split()
        enabled = (_read(node / "cgroup.subtree_control") or "").split()
        for ctl in _V2_WANTED:
            if ctl in available and ctl not in enabled:
                try:
                    _write(node / "cgroup.subtree_control", f"+{ctl}")
                except OSError:
                    pass  # e.g. EBUSY: a namespace root holding processes; detect() then fails


def detect(root: Path = CGROUP_ROOT, parent: str = PARENT) -> str:
    """"cgroup2", "cgroup1" or "rlimit": a cgroup mode only if a group can really be made here.

    Probes by creating and removing ``<parent>/probe-…`` (leaving the empty parent in place).
    """
    probe = f"probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        if (root / "cgroup.controllers").is_file():
            (root / parent).mkdir(exist_ok=True)
            _enable_v2(root, root / parent)
            (root / parent / probe).mkdir()
            try:
                usable = (_read(root / parent / probe / "cgroup.controllers") or "").split()
            finally:
                (root / parent / probe).rmdir()
            return "cgroup2" if {"cpu", "memory"} <= set(usable) else "rlimit"
        mounts = _v1_mounts(root)
        if {"memory", "cpu"} <= mounts.keys():
            for ctl in ("memory", "cpu"):
                (mounts[ctl] / parent).mkdir(exist_ok=True)
                (mounts[ctl] / parent / probe).mkdir()
                (mounts[ctl] / parent / probe).rmdir()
            return "cgroup1"
    except OSError:
        pass
    return "rlimit"


class Limits:
    """Creates, fills, describes and removes the per-compute groups of one cgroup tree."""

    def __init__(self, mode: str | None = None, root: Path = CGROUP_ROOT, parent: str = PARENT):
        self.root = Path(root)
        self.parent = parent
        self.mode = mode or detect(self.root, parent)
        if self.mode not in MODES:
            raise ValueError(f"limits mode must be one of {', '.join(MODES)}, not {mode!r}")

    # --- lifecycle ------------------------------------------------------------------------------

    def create(self, compute_id: str, vcpu: float, memory_bytes: int) -> dict[str, Any]:
        """Make (or re-limit) the compute's group(s); returns the handle to store."""
        if not _ID.match(compute_id):
            raise ValueError(f"compute id {compute_id!r} cannot name a group "
                             "(letters, digits, '.', '_', '-')")
        handle: dict[str, Any] = {"mode": self.mode, "compute_id": compute_id, "paths": [],
                                  "vcpu": float(vcpu), "memory_bytes": int(memory_bytes)}
        quota = max(1000, int(vcpu * PERIOD_US))
        try:
            if self.mode == "cgroup2":
                self._create_v2(handle, compute_id, quota, int(memory_bytes))
            elif self.mode == "cgroup1":
                self._create_v1(handle, compute_id, quota, int(memory_bytes))
            else:
                handle["address_space_bytes"] = max(int(memory_bytes), RLIMIT_AS_FLOOR)
        except OSError as exc:
            raise LimitsError(f"cannot limit compute {compute_id} to {vcpu:g} vCPU and "
                              f"{format_size(memory_bytes)}: {exc.filename or ''}: "
                              f"{exc.strerror or exc}") from exc
        return handle

    def _create_v2(self, handle: dict, compute_id: str, quota: int, mem: int) -> None:
        parent = self.root / self.parent
        parent.mkdir(exist_ok=True)
        _enable_v2(self.root, parent)
        group = parent / compute_id
        group.mkdir(exist_ok=True)
        handle["paths"] = [str(group)]
        _write(group / "cpu.max", f"{quota} {PERIOD_US}")
        _write(group / "memory.max", str(mem))
        if (group / "pids.max").exists():
            _write(group / "pids.max", str(_pids(handle["vcpu"])))
        if (group / "memory.swap.max").exists():
            _write(group / "memory.swap.max", "0")

    def _create_v1(self, handle: dict, compute_id: str, quota: int, mem: int) -> None:
        mounts = _v1_mounts(self.root)
        if not {"memory", "cpu"} <= mounts.keys():
            raise LimitsError(f"cgroup v1 memory and cpu controllers are not both mounted under "
                              f"{self.root}")
        for mount in dict.fromkeys(mounts.values()):  # cpu,cpuacct once
            group = mount / self.parent / compute_id
            group.mkdir(parents=True, exist_ok=True)
            handle["paths"].append(str(group))
        cpu = mounts["cpu"] / self.parent / compute_id
        _write(cpu / "cpu.cfs_period_us", str(PERIOD_US))
        _write(cpu / "cpu.cfs_quota_us", str(quota))
        pids = mounts["pids"] / self.parent / compute_id / "pids.max" if "pids" in mounts \
            else None
        if pids is not None and pids.exists():
            _write(pids, str(_pids(handle["vcpu"])))
        memg = mounts["memory"] / self.parent / compute_id
        files = [memg / "memory.limit_in_bytes", memg / "memory.memsw.limit_in_bytes"]
        files = [f for f in files if f.exists()]
        # The kernel keeps limit <= memsw limit: when raising, raise memsw first.
        current = int((_read(files[0]) or "0").strip() or 0)
        for f in (files if mem <= current else reversed(files)):
            _write(f, str(mem))

    def add_process(self, handle: dict, pid: int) -> None:
        """Put ``pid`` under the compute's limits; what it forks afterwards inherits them."""
        if handle["mode"] == "rlimit":
            cap = handle.get("address_space_bytes", max(handle["memory_bytes"], RLIMIT_AS_FLOOR))
            _, hard = resource.prlimit(pid, resource.RLIMIT_AS)
            if hard != resource.RLIM_INFINITY:
                cap = min(cap, hard)
            resource.prlimit(pid, resource.RLIMIT_AS, (cap, cap))
            return
        for path in handle["paths"]:
            try:
                _write(Path(path) / "cgroup.procs", str(pid))
            except ProcessLookupError:
                raise
            except OSError as exc:
                raise LimitsError(f"cannot move process {pid} into {path}: "
                                  f"{exc.strerror or exc}") from exc

    def command(self, handle: dict, argv: list[str]) -> list[str]:
        """``argv`` prefixed so the process joins the limits before it execs (no fork escapes)."""
        if handle["mode"] == "rlimit":
            kib = handle.get("address_space_bytes", RLIMIT_AS_FLOOR) // 1024
            return ["/bin/sh", "-c", _ULIMIT, "flowsession-limits", str(kib), *argv]
        procs = [str(Path(p) / "cgroup.procs") for p in handle["paths"]]
        return ["/bin/sh", "-c", _JOIN, "flowsession-limits", str(len(procs)), *procs, *argv]

    def destroy(self, handle: dict) -> None:
        """SIGKILL what is left in the groups, then remove them. Idempotent."""
        if handle["mode"] == "rlimit":
            return
        paths = [Path(p) for p in handle["paths"]]
        for path in paths:  # v2 kills the whole subtree at once where the kernel can
            if (path / "cgroup.kill").exists():
                try:
                    _write(path / "cgroup.kill", "1")
                except OSError:
                    pass
        deadline = time.monotonic() + 5.0
        while (pids := self.processes(handle)) and time.monotonic() < deadline:
            for pid in pids:  # repeated: a process may fork between reading and killing
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.02)
        for path in paths:
            for dirpath, _, _ in os.walk(path, topdown=False):
                while True:
                    try:
                        os.rmdir(dirpath)
                        break
                    except FileNotFoundError:
                        break
                    except OSError as exc:  # EBUSY: an exiting process still counted
                        if time.monotonic() > deadline:
                            raise LimitsError(f"cannot remove {dirpath}: {exc.strerror}; "
                                              f"processes left: {self.processes(handle)}") from exc
                        time.sleep(0.02)

    # --- reading --------------------------------------------------------------------------------

    def processes(self, handle: dict) -> list[int]:
        """Pids in the compute's groups (and any subgroups); [] in rlimit mode."""
        pids: set[int] = set()
        for path in handle.get("paths", []):
            for dirpath, _, _ in os.walk(path):
                text = _read(Path(dirpath) / "cgroup.procs") or ""
                pids.update(int(line) for line in text.split())
        return sorted(pids)

    def usage(self, handle: dict) -> dict[str, Any]:
        """Best effort: {"memory_bytes": in use or None, "cpu_seconds": consumed or None}."""
        out: dict[str, Any] = {"memory_bytes": None, "cpu_seconds": None}
        for path in map(Path, handle.get("paths", [])):
            if (mem := _read(path / "memory.usage_in_bytes") or _read(path / "memory.current")):
                out["memory_bytes"] = int(mem)
            if (ns := _read(path / "cpuacct.usage")):
                out["cpu_seconds"] = int(ns) / 1e9
            for line in (_read(path / "cpu.stat") or "").splitlines():
                key, _, value = line.partition(" ")
                if key == "usage_usec" and out["cpu_seconds"] is None:
                    out["cpu_seconds"] = int(value) / 1e6
        return out

    @staticmethod
    def memory_kills(handle: dict) -> int | None:
        """How many processes the kernel's OOM killer has killed in the compute's group because
        it reached its memory limit (v2 ``memory.events``, v1 ``memory.oom_control``:
        ``oom_kill N``); None in rlimit mode or where the kernel does not count them."""
        for path in map(Path, handle.get("paths", []) if handle.get("mode") != "rlimit" else []):
            for name in ("memory.events", "memory.oom_control"):
                for line in (_read(path / name) or "").splitlines():
                    key, _, value = line.partition(" ")
                    if key == "oom_kill" and value.strip().isdigit():
                        return int(value.strip())
        return None

    @staticmethod
    def describe(handle: dict) -> str:
        """One line for ``session show``: what holds the compute to its size, and how."""
        vcpu, mem = handle["vcpu"], handle["memory_bytes"]
        quota = max(1000, int(vcpu * PERIOD_US))
        if handle["mode"] == "cgroup1":
            return (f"cgroup v1: {vcpu:g} vCPU (cpu.cfs_quota_us={quota}), "
                    f"memory {format_size(mem)} (memory.limit_in_bytes)")
        if handle["mode"] == "cgroup2":
            return (f"cgroup v2: {vcpu:g} vCPU (cpu.max={quota} {PERIOD_US}), "
                    f"memory {format_size(mem)} (memory.max)")
        cap = handle.get("address_space_bytes", max(mem, RLIMIT_AS_FLOOR))
        return (f"rlimit: address space {format_size(cap)} per process; "
                "CPU not limited (no cgroup access)")

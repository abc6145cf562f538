"""A real Ray cluster on 127.0.0.1 for tests: a head and worker nodes, each a
``ray start --block`` process of this test run, stopped by its own pids.

Never ``ray stop``: it kills every Ray process on the machine by name, other people's too.
Each node here is ``ray start ... --block`` in a process group of its own; stopping sends it
SIGTERM (it then stops the node's processes itself), and afterwards SIGKILLs whatever is left
of that process group and of the processes seen under it, by pid. Its files live in a temp dir
of its own (never /tmp/ray, which other people's Ray uses).

Ray binds the machine's address, not 127.0.0.1, wherever it can find one: a cluster may only
start in a network namespace holding loopback alone (``tests/helpers/netns.py``), and
``RayCluster`` refuses to start anywhere else.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from flowsession.backends.compute.procs import alive, start_time
from helpers.netns import loopback_only

RAY = Path(sys.executable).with_name("ray")
IP = "127.0.0.1"
MiB = 1 << 20
# system settings of the head (GCS): how long until a node that stopped answering is dead.
# Ray's defaults (3 s period x 5 failures) make a lost node take ~15 s to be declared dead.
HEALTH_CHECK = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                "RAY_health_check_failure_threshold": "3"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((IP, 0))
        return s.getsockname()[1]


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def descendants(pid: int) -> list[int]:
    tree, found, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
    except OSError:
        return []


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def pss_bytes(pid: int) -> int:
    """Proportional set size: shared pages divided among the processes sharing them."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class RayNode:
    name: str
    proc: subprocess.Popen  # `ray start --block`
    log: Path
    started_s: float = 0.0  # how long `ray start` took until the node was up
    # every process ever seen under it, as (pid, start time): a reused pid is not ours
    seen: set[tuple[int, str]] = field(default_factory=set)

    def pids(self) -> list[int]:
        """The node's live processes: its `ray start`, everything under it, and any process
        once seen under it that was since orphaned (the same pid AND start time)."""
        pids = {self.proc.pid, *descendants(self.proc.pid)} if self.proc.poll() is None \
            else set()
        for pid in pids:
            if (st := start_time(pid)) is not None:
                self.seen.add((pid, st))
        pids.update(pid for pid, st in self.seen if alive(pid, st))
        return sorted(pids)

    def raylet_pid(self) -> int:
        for pid in self.pids():
            if _comm(pid) == "raylet":
                return pid
        raise LookupError(f"node {self.name} has no raylet")

    @property
    def node_id(self) -> str:
        for arg in _cmdline(self.raylet_pid()):
            if arg.startswith("--node_id="):
                return arg.split("=", 1)[1]
        raise LookupError(f"node {self.name}: no --node_id on its raylet")


class RayCluster:
    """``with RayCluster() as c: c.add_node("b", cpus=2)``; ``c.address`` for ``ray.init``."""

    def __init__(self, *, head_cpus: int = 1, head_memory: int = 1024 * MiB,
                 object_store_memory: int = 100 * MiB, node_env=None):
        if not loopback_only():
            raise RuntimeError(
                "a Ray cluster binds the machine's address outside a network namespace "
                "holding only loopback: run through tests/helpers/netns.py (make test-ray)")
        self.dir = Path(tempfile.mkdtemp(prefix="fsray-", dir="/tmp"))  # short: socket paths
        self.port = free_port()
        self.address = f"{IP}:{self.port}"
        self.object_store_memory = object_store_memory
        self.nodes: dict[str, RayNode] = {}
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith("RAY_") and k != "VIRTUAL_ENV"}
        self.env.update(HEALTH_CHECK, RAY_USAGE_STATS_ENABLED="0")
        # node_env(name) -> the variables of that node's processes (its FLOWSESSION_NODE_HOME)
        self.node_env = node_env or (lambda name: {})
        try:
            self._start("head", ["--head", "--port", str(self.port), "--temp-dir",
                                 str(self.dir), "--include-dashboard", "false"],
                        cpus=head_cpus, memory=head_memory, resources={"head": 1})
        except BaseException:
            self.stop()
            raise

    def add_node(self, name: str, *, cpus: int = 1, memory: int = 1024 * MiB,
                 resources: dict[str, float] | None = None) -> RayNode:
        """A worker node; it has the custom resource ``name`` (1) besides ``resources``."""
        return self._start(name, ["--address", self.address], cpus=cpus, memory=memory,
                           resources={name: 1, **(resources or {})})

    def _start(self, name: str, args: list[str], *, cpus: int, memory: int,
               resources: dict[str, float], timeout: float = 90) -> RayNode:
        if name in self.nodes:
            raise ValueError(f"node {name} exists")
        log = self.dir / f"{name}.log"
        cmd = [str(RAY), "start", *args, "--block", "--node-ip-address", IP,
               "--num-cpus", str(cpus), "--memory", str(memory),
               "--object-store-memory", str(self.object_store_memory),
               "--resources", json.dumps(resources), "--disable-usage-stats"]
        t0 = time.monotonic()
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, env={**self.env, **self.node_env(name)}, stdout=out,
                                    stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        node = self.nodes[name] = RayNode(name, proc, log)
        deadline = t0 + timeout
        while b"Ray runtime started" not in log.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray node {name} did not start:\n"
                                   + log.read_text(errors="replace")[-4000:])
            time.sleep(0.05)
        node.started_s = time.monotonic() - t0
        node.raylet_pid()  # and remember its pids
        return node

    def kill_raylet(self, name: str) -> int:
        """SIGKILL the node's raylet, as a lost machine: the node's `ray start` then stops
        the rest of that node (its workers die with their raylet). Returns the pid."""
        pid = self.nodes[name].raylet_pid()
        os.kill(pid, signal.SIGKILL)
        return pid

    def memory(self) -> dict[str, int]:
        """PSS and RSS of every process of the cluster, summed, in bytes."""
        pss = rss = 0
        for node in self.nodes.values():
            for pid in node.pids():
                pss += pss_bytes(pid)
                with contextlib.suppress(OSError, IndexError, ValueError), \
                        open(f"/proc/{pid}/statm") as fh:
                    rss += int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return {"pss": pss, "rss": rss}

    def processes(self) -> dict[str, list[tuple[int, str]]]:
        return {name: [(pid, _comm(pid)) for pid in node.pids()]
                for name, node in self.nodes.items()}

    def stop(self, grace: float = 15.0) -> None:
        """Worker nodes first, the head last: SIGTERM each `ray start`, wait, then SIGKILL
        what is left of its process group and of every pid seen under it."""
        for node in reversed(list(self.nodes.values())):
            node.pids()
            if node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    node.proc.wait(grace)
            if any(alive(pid, st) and _pgid(pid) == node.proc.pid for pid, st in node.seen):
                os.killpg(node.proc.pid, signal.SIGKILL)  # the group it leads: ours
            for pid, started in node.seen:
                if alive(pid, started):
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RayCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

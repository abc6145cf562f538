"""A session's supervisor on the machine it runs on: its slot, its launch, its end.

Both compute backends run sessions with this code: the local backend on the control plane's
machine, the Ray backend inside a session actor on a cluster node. What a session needs on
its machine lives in a *slot*: ``<runtime>/slots/<id>/{flow,work,state}``. Inside the sandbox
the slot is ``/session``: ``flow`` read-only, ``work`` and ``state`` writable by the session --
and so by its flow's code, which is hostile. Nothing here follows a path there or writes
there except through ``boundary`` (no symlink followed, regular files only, bounded). What is
the launcher's own lives in ``<runtime>/control/<id>/``, which no session sees: the
supervisor's socket (bound here and handed to the supervisor as a descriptor, so a session
cannot replace it) and the session's log (the supervisor's stdout and stderr; the session can
only append to it).

Stdlib, ``boundary``, ``procs`` and ``sandbox`` only.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import flowsession

from flowsession.backends.compute import boundary, procs, sandbox
from flowsession.worker import protocol

INSIDE = "/session"  # the slot, as the sandboxed session sees it
RUNS = "runs"  # the runs' folders, under the slot's state/
SOCKET, SESSION_LOG = "s.sock", "session.log"  # in the control dir
MAX_SALVAGE = 256 * 1024 * 1024  # what is rescued of an ended session's run, at most
MAX_FILE = 4 * 1024 * 1024 * 1024  # RLIMIT_FSIZE of a session's processes
PACKAGE_INSIDE = "/opt/flowsession"  # where flowsession.worker is importable inside
RUN_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}$")
SLOT_ID = re.compile(r"^s[0-9a-f]{10}$")  # the ids Slot.new makes (the only ones a sweep trusts)
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Launched:
    pid: int
    pid_start: str
    socket: str
    proc: subprocess.Popen | None = field(default=None, compare=False, repr=False)


class Slot:
    """One session's folders on this machine (``runtime``: the machine's runtime dir)."""

    def __init__(self, runtime: Path, slot_id: str):
        if not RUN_ID.match(slot_id):
            raise ValueError(f"{slot_id!r} cannot name a slot")
        self.runtime, self.id = Path(runtime), slot_id
        self.path = self.runtime / "slots" / slot_id
        self.control = self.runtime / "control" / slot_id  # the launcher's own; no session sees it

    @classmethod
    def new(cls, runtime: Path) -> Slot:
        return cls(runtime, f"s{uuid.uuid4().hex[:10]}")

    @classmethod
    def at(cls, path: str | Path) -> Slot:
        """The slot whose folder is ``path`` (``<runtime>/slots/<id>``)."""
        path = Path(path)
        return cls(path.parent.parent, path.name)

    @property
    def socket(self) -> Path:
        return self.control / SOCKET

    @property
    def log(self) -> Path:
        return self.control / SESSION_LOG

    # --- starting ----------------------------------------------------------------------------

    def launch(self, python: str, read_only_paths: tuple[str, ...], *, idle_timeout_s: float,
               bwrap: str | None, hidden: list[str], die_with_parent: bool = False,
               popen: Callable[..., subprocess.Popen] = subprocess.Popen) -> Launched:
        """Spawn a supervisor in standby in ``python`` (the image's interpreter); returns at
        once (it imports the runtime meanwhile). ``die_with_parent``: the session is killed
        when the thread that calls ``popen`` ends (a Ray actor's; never a request's)."""
        for sub in ("flow", "work", "state"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)
        for path in read_only_paths:  # the images dir: a bind source
            Path(path).mkdir(parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)
        self.control.mkdir(parents=True, exist_ok=True)
        os.chmod(self.control.parent, 0o700)
        os.chmod(self.control, 0o700)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        log = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            with protocol.socket_address(self.socket) as address:
                listener.bind(address)
            listener.listen(64)
            inside = INSIDE if bwrap else str(self.path)
            argv = [python, "-m", "flowsession.worker.supervisor",
                    "--listen-fd", str(listener.fileno()), "--log-inherit",
                    "--state-dir", f"{inside}/state", "--standby",
                    "--idle-timeout", str(idle_timeout_s)]
            argv, environ = self._sandboxed(argv, python, read_only_paths, bwrap, hidden,
                                            die_with_parent)
            if die_with_parent:
                _load_libc()
            # every file a session writes is bounded (a flood of results or logs stops at it)
            argv = ["/bin/sh", "-c", 'ulimit -f "$1"; shift; exec "$@"', "flowsession-fsize",
                    str(MAX_FILE // 512), *argv]
            proc = popen(argv, env=environ, cwd=self.path / "work", start_new_session=True,
                         stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                         pass_fds=(listener.fileno(),),
                         preexec_fn=_die_with_parent if die_with_parent else None)
        finally:
            listener.close()
            os.close(log)
        return Launched(pid=proc.pid, pid_start=procs.start_time(proc.pid) or "",
                        socket=str(self.socket), proc=proc)

    def _sandboxed(self, argv: list[str], python: str, read_only_paths: tuple[str, ...],
                   bwrap: str | None, hidden: list[str], die_with_parent: bool
                   ) -> tuple[list[str], dict[str, str]]:
        package_root = str(Path(flowsession.__file__).resolve().parent.parent)
        base_env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
                    "PF_DISABLE_TRACING": "true", "PYTHONDONTWRITEBYTECODE": "1",
                    "PYTHONUNBUFFERED": "1"}
        if bwrap is None:
            environ = {**base_env, "HOME": str(self.path / "work"), "PYTHONPATH": package_root}
            return argv, environ
        box = sandbox.Sandbox(
            ro_binds=[(p, p) for p in (*read_only_paths, *sandbox.interpreter_paths(python))]
            + [(str(Path(package_root) / "flowsession"), f"{PACKAGE_INSIDE}/flowsession"),
               (str(self.path / "flow"), f"{INSIDE}/flow")],
            rw_binds=[(str(self.path / "work"), f"{INSIDE}/work"),
                      (str(self.path / "state"), f"{INSIDE}/state")],
            env={**base_env, "HOME": f"{INSIDE}/work", "PYTHONPATH": PACKAGE_INSIDE},
            chdir=f"{INSIDE}/work", hidden=hidden, die_with_parent=die_with_parent)
        return sandbox.wrap(argv, box, bwrap=bwrap), {}

    def place_flow(self, snapshot: Path, *, sandboxed: bool) -> str:
        """Copy a snapshot into the slot's flow folder, which the session sees read-only;
        its path as the session sees it."""
        target = self.path / "flow" / snapshot.name
        if not target.exists():
            tmp = target.with_name(f".{target.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(snapshot, tmp, symlinks=True)
            os.rename(tmp, target)
        return f"{INSIDE}/flow/{snapshot.name}" if sandboxed else str(target)

    def place_env(self, env_id: str, site_dirs: tuple[str, ...] | list[str], *,
                  sandboxed: bool) -> list[str]:
        """The environment's own packages, linked into the slot's read-only folder: a session
        sees its environment and no other (another user's private packages stay his), so no
        environments folder is ever bound whole. Hard links where the slot and the
        environment share a file system, else copies. The paths as the session sees them."""
        if env_id and not RUN_ID.match(env_id):
            raise ValueError(f"{env_id!r} cannot name an environment")
        inside = []
        for i, site in enumerate(site_dirs):
            target = self.path / "flow" / f".env-{env_id}-{i}"
            if not target.exists():
                tmp = target.with_name(f"{target.name}.tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(site, tmp, symlinks=True, copy_function=_link_or_copy)
                os.rename(tmp, target)
            inside.append(f"{INSIDE}/flow/{target.name}" if sandboxed else str(target))
        return inside

    # --- reading what it left ------------------------------------------------------------------

    def ended(self) -> tuple[dict | None, dict]:
        """(exit.json, status.json) of a supervisor that is gone, as bounded data."""
        with boundary.open_dir(self.path / "state") as state:
            return (boundary.read_json(state, protocol.EXIT_FILE),
                    boundary.read_json(state, protocol.STATUS_FILE) or {})

    def log_size(self) -> int:
        try:
            return self.log.stat().st_size
        except OSError:
            return 0

    def log_tail(self, *, tail_bytes: int) -> bytes | None:
        with boundary.open_dir(self.control) as d:
            got = boundary.read_file(d, SESSION_LOG, limit=tail_bytes, tail=True) if d else None
        return got[0] if got else None

    def log_lines(self, lines: int) -> str:
        with boundary.open_dir(self.control) as d:
            return boundary.tail_text(d, SESSION_LOG, lines=lines)

    def salvage(self) -> dict[str, list[bytes]]:
        """The records the session's runs wrote (complete lines), by run: read once the
        session has ended (every process of it dead), so nothing changes under us; still,
        nothing there is followed: a planted symlink, FIFO or device is skipped, and at most
        MAX_SALVAGE bytes of a run are read."""
        out: dict[str, list[bytes]] = {}
        with boundary.open_dir(self.path / "state") as state:
            if state is None:
                return out
            with boundary.open_dir(RUNS, at=state) as runs:
                if runs is None:
                    return out
                for run_id in boundary.entries(runs):
                    if RUN_ID.match(run_id):
                        with boundary.open_dir(run_id, at=runs) as run:
                            got = _complete_records(run) if run is not None else []
                        if got:
                            out[run_id] = got
        return out

    # --- ending ------------------------------------------------------------------------------

    def stop(self, launched: Launched, *, reason: str, grace: float = 5.0) -> None:
        """Ask the supervisor to shut down, then kill whatever is left of it (blocking: for
        a thread that may wait, a Ray actor's; the local backend asks without one)."""
        if procs.alive(launched.pid, launched.pid_start):
            with contextlib.suppress(OSError, protocol.ProtocolError):
                protocol.request(launched.socket, {"op": "shutdown", "reason": reason}, grace)
            deadline = time.monotonic() + grace
            while procs.alive(launched.pid, launched.pid_start) and time.monotonic() < deadline:
                time.sleep(0.02)
        self.kill(launched)

    @staticmethod
    def kill(launched: Launched) -> None:
        """Kill whatever is left of the session: its process tree and its process group."""
        if procs.alive(launched.pid, launched.pid_start):
            for pid in [*procs.tree(launched.pid), launched.pid]:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.killpg(launched.pid, signal.SIGKILL)  # the session's own process group

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        shutil.rmtree(self.control, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


_LIBC = None


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the thread that forked us ends (libc was
    loaded in the parent: nothing is loaded between fork and exec)."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _load_libc() -> None:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)


def _complete_records(run_fd: int) -> list[bytes]:
    """The complete lines of a run folder's results files (at most MAX_SALVAGE bytes)."""
    budget, out = MAX_SALVAGE, []
    for name in boundary.entries(run_fd):
        if budget <= 0 or not (name.startswith("results.") and name.endswith(".jsonl")):
            continue
        got = boundary.read_file(run_fd, name, limit=budget)
        if got is None:
            continue
        data = got[0]
        budget -= len(data)
        out += [line for line in data[:data.rfind(b"\n") + 1].split(b"\n")[:-1]
                if len(line) <= boundary.MAX_RECORD]
    return out

"""Processes named so that a reused pid is never mistaken for ours: "pid:start-time"."""

from __future__ import annotations

import os


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode(errors="replace")
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def identity(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"{pid}:{start_time(pid)}"


def alive(pid: int, started: str | None) -> bool:
    """Is the process ``pid`` that started at ``started`` still there (and not a zombie)?"""
    reap(pid)
    st = start_time(pid)
    if st is None or (started is not None and st != started):
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().decode(errors="replace").rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def identity_alive(ident: str | None) -> bool:
    if not ident:
        return False
    pid, _, started = ident.partition(":")
    return alive(int(pid), started or None)


def reap(pid: int) -> None:
    """Collect the exit status of ``pid`` if it is our exited child (else a zombie stays)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not our child: its own parent (or init) reaps it


def with_argument_under(prefix: str) -> dict[int, str]:
    """Processes with a command-line argument under the path ``prefix``: pid -> that argument."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                args = fh.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        for arg in args:
            if arg.startswith(prefix):
                found[int(entry)] = arg
                break
    return found


def parents() -> dict[int, int]:
    """pid -> parent pid of every process (host pids)."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as fh:
                    stat = fh.read().decode(errors="replace").rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            out[int(entry)] = int(stat[1])
    return out


def tree(pid: int) -> list[int]:
    """The processes below ``pid`` (its children, theirs, ...), host pids."""
    children: dict[int, list[int]] = {}
    for child, parent in parents().items():
        children.setdefault(parent, []).append(child)
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def descends(pid: int, ancestors: set[int], parent_of: dict[int, int]) -> bool:
    """Is ``pid`` below one of ``ancestors`` (itself excluded)?"""
    seen = 0
    while (pid := parent_of.get(pid, 0)) > 1 and seen < 4096:
        if pid in ancestors:
            return True
        seen += 1
    return False

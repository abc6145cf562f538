"""File-system steps the caches (and others) share: cross-process locks, temporary build
directories, atomic installation and removal that never leaves a half-deleted tree at a final
path."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path


@contextlib.asynccontextmanager
async def exclusive(lock_file: Path) -> AsyncIterator[None]:
    """Hold an exclusive ``flock`` on ``lock_file``: one holder at a time across processes and
    within one (each entry opens its own file description). Released if the process dies."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(lock_file: Path) -> Iterator[None]:
    """``exclusive`` for code that may block while it waits: held until the block ends."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as f:  # closing it releases the lock
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def temp_dir_for(final: Path) -> Path:
    """A fresh sibling of ``final`` to build in (same file system, so the rename is atomic)."""
    return final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"


def clear_stale(final: Path) -> list[Path]:
    """Remove what killed builds of ``final`` left behind. Call only while holding its lock."""
    stale = list(final.parent.glob(f".tmp-{final.name}-*"))
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def install(tmp: Path, final: Path) -> None:
    """Move a finished build into place in one step."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():  # a previous build that lost its record: replace it atomically
        discard(final)
    os.rename(tmp, final)


def discard(path: Path) -> None:
    """Delete a tree so that it vanishes from its path at once, then free the space."""
    if not path.exists():
        return
    trash = path.parent / f".trash-{path.name}-{uuid.uuid4().hex[:8]}"
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)

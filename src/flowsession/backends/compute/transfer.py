"""Snapshots as data: a flow's snapshot packed into bytes on the control plane and unpacked on a
node that does not share its disk. A snapshot holds regular files and folders only (symlinks
were followed when it was made); anything else is refused on both sides. Stdlib only.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import uuid
from pathlib import Path

MAX_SNAPSHOT = 256 * 1024 * 1024  # a flow's snapshot, packed


def pack(folder: Path) -> bytes:
    """``folder``'s files (relative paths, contents, executable bits) as a tar in memory."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(folder.rglob("*")):
            if path.is_symlink() or not (path.is_file() or path.is_dir()):
                raise ValueError(f"a snapshot holds files and folders only: {path}")
            info = tar.gettarinfo(str(path), arcname=path.relative_to(folder).as_posix())
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if path.is_file():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
            if buf.tell() > MAX_SNAPSHOT:
                raise ValueError(f"the snapshot at {folder} is over "
                                 f"{MAX_SNAPSHOT // (1024 * 1024)} MB packed")
    return buf.getvalue()


def unpack(data: bytes, target: Path) -> Path:
    """Unpack ``pack``'s bytes into ``target`` (made at once, by a rename; a ``target`` that
    exists is kept: snapshots are content-addressed). Files and folders only, inside
    ``target`` only (tarfile's ``data`` filter)."""
    if target.exists():
        return target
    if len(data) > MAX_SNAPSHOT:
        raise ValueError("the snapshot is too large")
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir(parents=True)
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            members = tar.getmembers()
            for m in members:
                if not (m.isfile() or m.isdir()):
                    raise ValueError(f"a snapshot holds files and folders only: {m.name}")
            tar.extractall(tmp, members=members, filter="data")
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target

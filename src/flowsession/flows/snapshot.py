"""Immutable, content-addressed copies of a flow folder ("snapshots").

A session runs a snapshot, never the user's live folder: edits made while a run is going do
not leak into it, and two sessions of the same content share one copy. A snapshot holds

* every file of the flow folder, except caches and tool state (``__pycache__/``, ``*.pyc``,
  ``.git/``, ``.promptflow/``, ``.venv/``, ``.runs/``), and
* each ``additional_includes`` entry (a file or folder, relative to the flow folder), copied
  to the snapshot root under its base name, as prompt flow does.

Its id is a sha256 over the sorted (relative path, executable bit, file content) of everything
copied, so the same content always gives the same id and any change gives a new one. Empty
folders carry no content and are not copied. Snapshots are built in a temp folder under the
store and renamed into place, so a snapshot folder that exists is complete; then made
read-only. Symlinks are followed (their target's content is copied) but may only point into
the flow folder or an additional include.

A flow with a ``root`` (an uploaded flow, see ``load_flow``) is confined to it: every include and
every symlink must resolve inside the root, and messages name files by their path inside the
flow, never by where the server keeps them. The snapshot of such a flow is confined to itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from flowsession.errors import FlowFileError
from flowsession.flows.flowfile import (
    OUTSIDE_HINT,
    FlowDefinition,
    include_name,
    load_flow,
    outside_root,
)

SKIPPED_NAMES = frozenset({"__pycache__", ".git", ".promptflow", ".venv", ".runs"})
SKIPPED_SUFFIXES = (".pyc",)
ID_LENGTH = 16
_FORMAT = b"flowsession-snapshot-v1\n"  # change it if the hashing below ever changes
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Snapshot:
    """A finished snapshot. ``flow`` is loaded from the copy, so its paths point inside it."""

    id: str
    path: Path
    flow: FlowDefinition
    source: Path
    digest: str = ""  # the full sha256 the id is the start of


@dataclass(frozen=True)
class _Entry:
    rel: str  # posix path inside the snapshot
    src: Path  # where its bytes come from (symlinks followed)
    executable: bool
    shown: str  # how messages name it


def make_snapshot(flow: FlowDefinition, store_dir: str | os.PathLike[str]) -> Snapshot:
    """Copy ``flow`` into ``store_dir/<id>/`` (or reuse the copy that is already there).

    Safe to call concurrently for the same flow: every caller gets the same snapshot.
    """
    store = Path(store_dir).resolve()
    store.mkdir(parents=True, exist_ok=True)
    entries = _manifest(flow, skip=store)
    digest = _combine(entries, [_file_digest(e) for e in entries])
    if not _already_made(store / digest[:ID_LENGTH]):
        digest = _build(entries, store)  # the content may have moved on since we hashed it
    path = store / digest[:ID_LENGTH]
    return Snapshot(
        id=digest[:ID_LENGTH],
        path=path,
        flow=load_flow(path / flow.file.name, root=path if flow.root is not None else None),
        source=flow.folder,
        digest=digest,
    )


def snapshot_id_of(flow: FlowDefinition, *, store_dir: str | os.PathLike[str] | None = None) -> str:
    """The id ``make_snapshot`` would give ``flow`` now, computed without copying anything.

    Pass ``store_dir`` when the store might sit inside the flow folder, so it is left out.
    """
    skip = Path(store_dir).resolve() if store_dir is not None else None
    entries = _manifest(flow, skip=skip)
    return _combine(entries, [_file_digest(e) for e in entries])[:ID_LENGTH]


def check_contents(flow: FlowDefinition) -> None:
    """Refuse what ``make_snapshot`` would refuse (an include that is missing, collides or
    leaves the flow's root, a symlink out, a socket), without reading or copying a file."""
    _manifest(flow, skip=None)


# --- what goes in ----------------------------------------------------------------------------


def _manifest(flow: FlowDefinition, *, skip: Path | None) -> list[_Entry]:
    """Everything a snapshot of ``flow`` holds, sorted by path; checks includes and symlinks."""
    folder = flow.folder.resolve()
    includes = []  # (field, entry, name at the snapshot root, source path)
    for i, inc in enumerate(flow.additional_includes):
        field = f"additional_includes[{i}]"
        name, src = include_name(inc), flow.folder / inc
        if name in ("", ".", ".."):
            raise flow.error(
                f"'{inc}' does not name a file or folder",
                field=field,
                hint="name the file or folder itself, e.g. ../common/ or ../requirements.txt",
            )
        if not flow.confines(src):  # checked before anything about it is told
            raise flow.error(outside_root(inc), field=field, hint=OUTSIDE_HINT)
        if not src.exists():
            looked = f" (looked for {src.resolve()})" if flow.root is None else ""
            raise flow.error(
                f"the include '{inc}' does not exist{looked}",
                field=field,
                hint="fix the path; it is relative to the flow folder",
            )
        real = src.resolve()
        if real == folder or folder.is_relative_to(real):
            raise flow.error(
                f"the include '{inc}' contains the flow folder itself",
                field=field,
                hint="include only the files or folders the flow needs",
            )
        includes.append((field, inc, name, src))

    allowed = [flow.root] if flow.root is not None else [folder] + [
        src.resolve() for *_, src in includes]
    walker = _Walker(allowed, skip, flow.show, confined=flow.root is not None)
    entries = walker.walk(flow.folder, "")
    owners = {
        e.rel.split("/", 1)[0]: f"the flow folder's '{e.rel.split('/', 1)[0]}'" for e in entries
    }
    for field, inc, name, src in includes:
        if name in owners:
            raise flow.error(
                f"the include '{inc}' would be copied to the snapshot as '{name}', "
                f"which collides with {owners[name]}",
                field=field,
                hint="rename one of them or remove the duplicate; includes land at the flow "
                "folder's root under their base name",
            )
        owners[name] = f"{field} ('{inc}')"
        if src.is_dir():
            entries += walker.walk(src, name + "/")
        else:
            entries.append(_Entry(name, src, _is_executable(src.stat().st_mode), flow.show(src)))
    return sorted(entries, key=lambda e: e.rel)


class _Walker:
    """Lists the files under a folder, following symlinks that stay inside ``allowed`` roots."""

    def __init__(self, allowed: list[Path], skip: Path | None, show: Callable[[Path], str],
                 *, confined: bool):
        self.allowed, self.skip, self.show, self.confined = allowed, skip, show, confined

    def walk(
        self, directory: Path, prefix: str, _stack: frozenset[Path] = frozenset()
    ) -> list[_Entry]:
        real = directory.resolve()
        if real in _stack:
            raise FlowFileError(
                f"the symlink loops back to {self.show(real)}",
                file=self.show(directory),
                hint="remove the symlink loop from the flow folder",
            )
        stack = _stack | {real}
        out: list[_Entry] = []
        with os.scandir(directory) as it:
            items = sorted(it, key=lambda item: item.name)
        for item in items:
            if item.name in SKIPPED_NAMES or item.name.endswith(SKIPPED_SUFFIXES):
                continue
            path, rel = Path(item.path), prefix + item.name
            if item.is_symlink():
                self.check_link(path)
            mode = path.stat().st_mode
            if stat.S_ISDIR(mode):
                if self.skip is None or path.resolve() != self.skip:
                    out += self.walk(path, rel + "/", stack)
            elif stat.S_ISREG(mode):
                out.append(_Entry(rel, path, _is_executable(mode), self.show(path)))
            else:
                raise FlowFileError(
                    "is not a regular file or folder (a socket, pipe or device?)",
                    file=self.show(path),
                    hint="move it out of the flow folder",
                )
        return out

    def check_link(self, path: Path) -> None:
        """A symlink must lead somewhere allowed; an uploaded flow's is not told where it
        leads (that would tell the server's folders)."""
        target = path.resolve()
        if self.confined and not any(target.is_relative_to(root) for root in self.allowed):
            raise FlowFileError(
                "is a symlink that leads outside the uploaded flow",
                file=self.show(path),
                hint="upload the file itself instead of a link to it",
            )
        if not target.exists():
            to = "" if self.confined else f" (to {target})"
            raise FlowFileError(
                f"is a broken symlink{to}",
                file=self.show(path),
                hint="fix or remove the symlink",
            )
        if not any(target.is_relative_to(root) for root in self.allowed):
            raise FlowFileError(
                f"is a symlink to {target}, outside the flow folder",
                file=self.show(path),
                hint="copy the file into the flow folder, or list it (or its folder) in "
                "additional_includes",
            )


def _is_executable(mode: int) -> bool:
    return bool(mode & 0o111)


# --- hashing ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _read(entry: _Entry) -> Iterator[BinaryIO]:
    """Open a flow file for reading; an unreadable file is the flow's problem, said so."""
    try:
        f = open(entry.src, "rb")  # noqa: SIM115 - closed by the with below
    except OSError as exc:
        raise FlowFileError(
            f"cannot read the file ({exc.strerror})",
            file=entry.shown,
            hint="make it readable, or move it out of the flow folder",
        ) from None
    with f:
        yield f


def _file_digest(entry: _Entry) -> str:
    with _read(entry) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _combine(entries: list[_Entry], digests: list[str]) -> str:
    """One sha256 over (path, executable bit, content digest) of each entry, in path order."""
    h = hashlib.sha256(_FORMAT)
    for entry, digest in zip(entries, digests, strict=True):
        h.update(
            b"%s\0%s\0%s\n"
            % (entry.rel.encode(), b"x" if entry.executable else b"-", digest.encode())
        )
    return h.hexdigest()


# --- building --------------------------------------------------------------------------------


def _already_made(path: Path) -> bool:
    return path.is_dir()


def _build(entries: list[_Entry], store: Path) -> str:
    """Copy ``entries`` into a temp folder, hash what was copied, rename it into place."""
    tmp: Path | None = Path(tempfile.mkdtemp(prefix=".tmp-", dir=store))
    try:
        digests = [_copy(e, tmp / e.rel) for e in entries]
        digest = _combine(entries, digests)
        for root, _dirs, _files in os.walk(tmp, topdown=False):
            os.chmod(root, 0o555)
        target = store / digest[:ID_LENGTH]
        try:
            os.rename(tmp, target)
            tmp = None
        except OSError:
            if not target.is_dir():  # not "another maker got there first"
                raise
        return digest
    finally:
        if tmp is not None:
            _remove_tree(tmp)


def _copy(entry: _Entry, dst: Path) -> str:
    """Copy one file, returning the sha256 of the bytes written; the copy is read-only."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    with _read(entry) as src, open(dst, "xb") as out:
        while chunk := src.read(_CHUNK):
            h.update(chunk)
            out.write(chunk)
    os.chmod(dst, 0o555 if entry.executable else 0o444)
    return h.hexdigest()


def _remove_tree(path: Path) -> None:
    """Best-effort removal of a (partly) read-only temp tree."""
    for root, _dirs, _files in os.walk(path):
        with contextlib.suppress(OSError):
            os.chmod(root, 0o700)
    shutil.rmtree(path, ignore_errors=True)

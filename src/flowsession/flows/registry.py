"""Flows registered on a server by name: uploaded (kept under ``<home>/flows/<owner>/<name>/``)
or a folder already on the server's machine. The only writer of the ``flows`` table.

An uploaded flow is confined to its own folder (``upload_root``): its files are plain files
written by the server (never symlinks), and its includes and symlinks must resolve inside it;
its errors name its files by their path in the flow. A folder of the server's machine (an
Owner's) keeps prompt flow's behaviour.

Writing a file is prompt flow's "Save": it changes the flow's folder, never a running session
(a changed ``requirements.txt`` takes effect with "Save and install"; other files at the next
line, as on the flow page)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import delete, insert, select
from sqlalchemy.exc import IntegrityError

from flowsession.config import Settings
from flowsession.errors import Conflict, InvalidInput, NotFound
from flowsession.flows.flowfile import FLOW_FILE_NAMES, check_saved_includes, load_flow
from flowsession.flows.paths import check_no_nul, file_in
from flowsession.flows.snapshot import check_contents
from flowsession.store import Store
from flowsession.store.tables import flows

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}$")
MAX_FILE = 16 * 1024 * 1024


@dataclass(frozen=True)
class RegisteredFlow:
    name: str
    owner: str
    path: str
    uploaded: bool
    created_at: float


class FlowRegistry:
    def __init__(self, settings: Settings, store: Store):
        self.settings, self.store = settings, store

    @property
    def root(self) -> Path:
        return self.settings.flows_dir

    def register(self, name: str, *, owner: str, path: str | None = None,
                 files: dict[str, str] | None = None) -> RegisteredFlow:
        """``path``: a folder on this machine; ``files``: relative path -> text (uploaded)."""
        if not _NAME.match(name):
            raise InvalidInput(f"flow name {name!r} is not valid",
                               hint="letters, digits, '_', '-' and '.'",
                               details={"field": "name"})
        if (path is None) == (files is None):
            raise InvalidInput("register a flow with either a path on the server or its files",
                               details={"field": "path"})
        uploaded = files is not None
        if uploaded and not files:
            raise InvalidInput("an uploaded flow needs its files (flow.dag.yaml or "
                               "flow.flex.yaml at least)", details={"field": "files"})
        if uploaded:
            folder = self.root / owner / name
            if folder.exists():
                raise Conflict(f"you have a flow named {name!r}", details={"flow": name})
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp = folder.parent / f".{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                for rel, text in files.items():
                    _write(file_in(tmp, rel, confined=True, field="files"), rel, text)
                # a bad flow is refused before it is registered, its includes first of all
                check_contents(load_flow(tmp, root=tmp))
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            os.rename(tmp, folder)
        else:
            folder = load_flow(check_no_nul(path, field="path")).folder
        try:
            with self.store.engine.begin() as conn:
                conn.execute(insert(flows).values(name=name, owner=owner, path=str(folder),
                                                  uploaded=uploaded, created_at=time.time()))
        except IntegrityError:
            if uploaded:
                shutil.rmtree(folder, ignore_errors=True)
            raise Conflict(f"you have a flow named {name!r}", details={"flow": name}) from None
        return self.get(name, owner=owner)

    def get(self, name: str, *, owner: str) -> RegisteredFlow:
        """``owner``'s flow ``name``; names are per owner."""
        with self.store.engine.connect() as conn:
            r = conn.execute(select(flows).where((flows.c.name == name)
                                                 & (flows.c.owner == owner))).first()
        if r is None:
            raise NotFound(f"flow {name!r} does not exist",
                           hint="list the flows: GET /api/flows", details={"flow": name})
        return RegisteredFlow(**r._mapping)

    def named(self, name: str) -> list[RegisteredFlow]:
        """Every owner's flow of that name (for those who manage everything)."""
        with self.store.engine.connect() as conn:
            return [RegisteredFlow(**r._mapping)
                    for r in conn.execute(select(flows).where(flows.c.name == name))]

    def by_path(self, path: str) -> RegisteredFlow | None:
        with self.store.engine.connect() as conn:
            r = conn.execute(select(flows).where(flows.c.path == path)).first()
        return RegisteredFlow(**r._mapping) if r else None

    def list(self, *, owner: str | None) -> list[RegisteredFlow]:
        q = select(flows).order_by(flows.c.name)
        if owner is not None:
            q = q.where(flows.c.owner == owner)
        with self.store.engine.connect() as conn:
            return [RegisteredFlow(**r._mapping) for r in conn.execute(q)]

    def files(self, flow: RegisteredFlow) -> list[str]:
        folder = Path(flow.path)
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                      if p.is_file() and "__pycache__" not in p.parts
                      and not p.name.startswith("."))

    def read(self, flow: RegisteredFlow, rel: str) -> str:
        name = flow.name
        target = file_in(Path(flow.path), rel, confined=flow.uploaded)
        try:
            return target.read_text()
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"flow {name!r} has no file {rel!r}",
                           details={"flow": name, "file": rel}) from None
        except IsADirectoryError:
            raise InvalidInput(f"{rel} is a folder, not a file", details={"file": rel}) from None
        except UnicodeDecodeError:
            raise InvalidInput(f"{rel} is not a text file", details={"file": rel}) from None

    def write(self, flow: RegisteredFlow, rel: str, text: str) -> None:
        """Save only: the file changes; a running session is not touched. An uploaded flow's
        flow file may not name includes outside the flow."""
        if len(text.encode()) > MAX_FILE:
            raise InvalidInput(f"{rel} is larger than {MAX_FILE // (1024 * 1024)} MB",
                               details={"file": rel})
        folder = Path(flow.path)
        target = file_in(folder, rel, confined=flow.uploaded)
        if flow.uploaded and rel in _FLOW_FILES:
            check_saved_includes(text, target, folder)
        _write(target, rel, text)

    def unregister(self, flow: RegisteredFlow) -> None:
        with self.store.engine.begin() as conn:
            conn.execute(delete(flows).where((flows.c.name == flow.name)
                                             & (flows.c.owner == flow.owner)))
        if flow.uploaded:
            shutil.rmtree(flow.path, ignore_errors=True)


_FLOW_FILES = frozenset(n for names in FLOW_FILE_NAMES.values() for n in names)


def upload_root(settings: Settings, flow: str | os.PathLike[str]) -> Path | None:
    """The folder the flow at ``flow`` is confined to when it is an upload: its own
    ``<flows_dir>/<owner>/<name>``. None for any other folder (a folder of the server's
    machine, prompt flow's behaviour). Judged by where the path is, before and after symlinks,
    so no link makes an upload look like something else."""
    base = settings.flows_dir
    for top, path in ((Path(os.path.abspath(base)), Path(os.path.abspath(flow))),
                      (base.resolve(), Path(flow).resolve())):
        if path.is_relative_to(top) and len(path.relative_to(top).parts) >= 2:
            owner, name = path.relative_to(top).parts[:2]
            return top / owner / name
    return None


def _write(target: Path, rel: str, text: str) -> None:
    """Write ``text`` to ``target`` through a temp file and a rename (a Save is whole)."""
    if target.is_dir():
        raise InvalidInput(f"{rel} is a folder, not a file", details={"file": rel})
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.rename(tmp, target)
    except (NotADirectoryError, FileExistsError):  # a file where the path needs a folder
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise InvalidInput(f"file path {rel!r} runs through a file of the flow",
                           hint="a file and a folder cannot have the same name",
                           details={"file": rel}) from None

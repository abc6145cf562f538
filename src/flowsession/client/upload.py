"""What a local flow folder uploads as: its text files, plus what its ``additional_includes``
bring in from outside it, so that the uploaded flow is self-contained.

A server confines an uploaded flow to its own folder, so an include such as
``../requirements.txt`` or ``../common/`` is bundled into the upload as
``_includes/requirements.txt`` / ``_includes/common/`` and the uploaded flow file names it
there (only those entries change; comments and layout stay). The server's snapshot then holds
each include at its root under its base name, exactly as prompt flow copies it. Includes
already inside the folder are uploaded as they are.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from flowsession.errors import InvalidInput

BUNDLE = "_includes"  # the folder of the upload that holds the includes from outside it
# folders and files never uploaded (the server refuses names starting with ".")
SKIP_DIRS = {"__pycache__", "node_modules", ".git", ".venv", "venv", ".promptflow"}
SKIP_SUFFIXES = {".pyc", ".pyo"}


def collect_files(folder: Path) -> dict[str, str]:
    """A flow folder's text files (relative POSIX path -> text) to upload, with its includes
    from outside the folder bundled under ``_includes/``; hidden files, caches and virtual
    environments left out. A binary file is refused, named."""
    from flowsession.flows.flowfile import include_name, load_flow, replace_includes  # yaml

    files = _text_files(folder, "")
    if not files:
        raise InvalidInput(f"flow folder {folder} has no files to upload",
                           details={"flow": str(folder)})
    flow = load_flow(folder)
    outside = {i: inc for i, inc in enumerate(flow.additional_includes)
               if not _within(folder, inc)}
    if not outside:
        return files
    if any(rel.split("/", 1)[0] == BUNDLE for rel in files):
        raise InvalidInput(f"the flow folder has a {BUNDLE}/ of its own, where its includes "
                           "from outside it would be uploaded",
                           hint=f"rename {folder / BUNDLE}", details={"flow": str(folder)})
    moved: dict[int, str] = {}
    for i, inc in outside.items():
        field = f"additional_includes[{i}]"
        src, name = folder / inc, include_name(inc)
        if name in ("", ".", ".."):
            raise flow.error(f"'{inc}' does not name a file or folder", field=field,
                             hint="name the file or folder itself, e.g. ../common/")
        if not src.exists():
            raise flow.error(f"the include '{inc}' does not exist", field=field,
                             hint="fix the path; it is relative to the flow folder")
        target = f"{BUNDLE}/{name}"
        if target in moved.values():
            raise flow.error(f"the include '{inc}' has the same name as another include "
                             f"('{name}'): both would be copied to the flow's root as '{name}'",
                             field=field, hint="rename one of them")
        if src.is_dir():
            files.update(_text_files(src, target + "/"))
        else:
            files[target] = _read_text(src, target)
        moved[i] = target
    files[flow.file.name] = replace_includes(flow.file.read_text(encoding="utf-8"), moved)
    return files


def _within(folder: Path, include: str) -> bool:
    """Does the include name something inside the flow folder, symlinks followed (so it is
    uploaded with the folder anyway)?"""
    p = PurePosixPath(os.path.normpath(include.replace("\\", "/")))
    if p.is_absolute() or p.parts[:1] == ("..",) or str(p) == ".":
        return False
    return (folder / p).resolve().is_relative_to(folder.resolve())


def _text_files(folder: Path, prefix: str) -> dict[str, str]:
    files: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") or part in SKIP_DIRS for part in rel.parts):
            continue
        if not path.is_file() or path.suffix in SKIP_SUFFIXES:
            continue
        files[prefix + rel.as_posix()] = _read_text(path, prefix + rel.as_posix())
    return files


def _read_text(path: Path, rel: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(f"{path} is not a UTF-8 text file: the server takes a flow's "
                           "text files only", hint="remove it from the flow folder, or "
                           "register a folder on the server's machine (on_server=True)",
                           details={"file": rel}) from None

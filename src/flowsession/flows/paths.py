"""Paths that arrive as text (an API field, a URL, an uploaded file's name) and where a flow may
draw its files from.

Text is checked before it touches the disk, so a NUL byte, a control character or an
over-long name is the caller's 422 naming the field, never the server's 500. A folder with a
``root`` (an uploaded flow) may only use what resolves inside that root: its includes, its
symlinks, its files; a folder without one (a folder of the server's machine, registered by an
Owner) keeps prompt flow's behaviour.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

from flowsession.errors import InvalidInput

MAX_NAME_BYTES = 255  # one file or folder name (Linux's NAME_MAX)
MAX_PATH_CHARS = 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_no_nul(text: str, *, field: str, what: str = "path") -> str:
    """``text`` unchanged, or InvalidInput naming ``field`` when it holds a NUL byte (which no
    path can: the operating system would refuse it with an error of its own)."""
    if "\x00" in text:
        raise InvalidInput(f"{field}: the {what} {text!r} contains a NUL byte",
                           hint=f"give a {what} without control characters",
                           details={"field": field})
    return text


def check_no_control(text: str, *, field: str, what: str = "name") -> str:
    """``text`` unchanged, or InvalidInput naming ``field`` when it holds a NUL byte or another
    control character (no name of a flow, a run or a file has one)."""
    check_no_nul(text, field=field, what=what)
    bad = _CONTROL.search(text)
    if bad:
        raise InvalidInput(f"{field}: the {what} {text!r} contains the control character "
                           f"{bad.group()!r}",
                           hint=f"give a {what} without control characters",
                           details={"field": field})
    return text


def check_path_text(text: str, *, field: str, what: str = "path") -> str:
    """``text`` unchanged, or InvalidInput naming ``field`` when it is no fit name for a file
    a user sends: a NUL byte or another control character, a name over 255 bytes, a path over
    1024 characters."""
    check_no_control(text, field=field, what=what)
    if len(text) > MAX_PATH_CHARS:
        raise InvalidInput(f"{field}: the {what} is longer than {MAX_PATH_CHARS} characters",
                           hint=f"give a shorter {what}", details={"field": field})
    if any(len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES
           for part in re.split(r"[/\\]", text)):
        raise InvalidInput(f"{field}: a name in the {what} is longer than {MAX_NAME_BYTES} bytes",
                           hint="give shorter file and folder names", details={"field": field})
    return text


def check_relative(rel: str, *, field: str, what: str = "file path") -> PurePosixPath:
    """A plain relative path inside a folder: not empty, not absolute, no '..', no hidden
    ('.') parts, no backslashes, no control characters."""
    check_path_text(rel, field=field, what=what)
    p = PurePosixPath(rel)
    if (not rel or "\\" in rel or p.is_absolute() or ".." in p.parts
            or any(part.startswith(".") for part in p.parts)):
        raise InvalidInput(f"{what} {rel!r} is not allowed",
                           hint="a relative path inside the flow's folder, without '..' or "
                                "hidden ('.') names", details={"field": field, "file": rel})
    return p


def inside(root: Path, path: str | os.PathLike[str]) -> bool:
    """Does ``path`` (symlinks followed, '..' applied) resolve inside ``root`` (resolved)?"""
    return Path(path).resolve().is_relative_to(root)


def file_in(folder: Path, rel: str, *, confined: bool, field: str = "file") -> Path:
    """The file ``rel`` of ``folder``, its name checked (``check_relative``). ``confined`` (an
    uploaded flow): no symlink on the way (the file itself included), and the path stays
    inside ``folder``."""
    parts = check_relative(rel, field=field).parts
    target = folder.joinpath(*parts)
    if confined:
        step = folder
        for part in parts:
            step = step / part
            if step.is_symlink():
                raise InvalidInput(f"file path {rel!r} is a symlink, which an uploaded flow "
                                   "may not hold", hint="upload the file itself",
                                   details={"field": field, "file": rel})
        if not inside(folder.resolve(), target):
            raise InvalidInput(f"file path {rel!r} leads outside the flow",
                               hint="a relative path inside the flow's folder",
                               details={"field": field, "file": rel})
    return target

"""Reading a flow's requirements file under the rules of the reference documents.

- ``promptflow``/``promptflow-tools`` (and the rest of the promptflow family) come from the image:
  an unpinned mention is satisfied by the image and dropped; a pin is refused.
- Local wheels, source paths and editable installs belong in a custom image, not here.
- ``-i``/``--index-url``/``--extra-index-url`` lines name package feeds; ``{private}`` in a feed's
  URL is filled from the identity's secret for that host at install time, never here.
- ``-r other.txt`` is read in place; ``-c other.txt`` adds constraints.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from flowsession.errors import RequirementsError

#: Packages every image provides; a flow may mention them but never pin them.
IMAGE_PROVIDED = frozenset(
    {"promptflow", "promptflow-core", "promptflow-tools", "promptflow-devkit", "promptflow-tracing"}
)
PRIVATE = "{private}"
_LOCAL_SUFFIXES = (".whl", ".tar.gz", ".zip", ".tgz")
_IGNORED_OPTIONS = {"--trusted-host", "--pre", "--prefer-binary", "--no-binary", "--only-binary"}


@dataclass(frozen=True)
class Feed:
    """A package index named in a requirements file (its URL may hold ``{private}``)."""

    url: str
    primary: bool  # -i/--index-url replaces the default index; --extra-index-url adds one

    @property
    def host(self) -> str:
        return feed_host(self.url)

    @property
    def needs_secret(self) -> bool:
        return PRIVATE in self.url


def feed_host(url: str) -> str:
    """The host[:port] a feed's URL is sent to: the one place it is read (the secret for
    ``{private}`` is chosen by it)."""
    return urlsplit(url).netloc.rsplit("@", 1)[-1].lower()


def check_feed(url: str, where: str, *, allow_local: bool) -> str:
    """A feed URL every reader sees the same way: http(s) (``file:`` only where local files
    are allowed), no backslash, space or control character (URL parsers differ on those), and
    ``{private}`` only as its whole user part, ``scheme://{private}@host/...``, so that its
    secret goes to that host and nowhere else."""
    bad = next((c for c in url if c == "\\" or c.isspace() or ord(c) < 32 or ord(c) == 127),
               None)
    schemes = ("http://", "https://", "file:") if allow_local else ("http://", "https://")
    if bad is not None or not url.lower().startswith(schemes):
        raise RequirementsError(f"{where}: '{url}' is not an http(s) URL of a package index",
                                hint="write the index's address, e.g. "
                                     "-i https://pkgs.example.com/simple")
    if PRIVATE in url:
        netloc = urlsplit(url).netloc
        if url.count(PRIVATE) != 1 or netloc.count("@") != 1 \
                or not netloc.startswith(PRIVATE + "@"):
            raise RequirementsError(
                f"{where}: {PRIVATE} may only be the whole user part of the feed's address",
                hint=f"write it as https://{PRIVATE}@HOST/simple")
    return url


@dataclass(frozen=True)
class FlowRequirements:
    """What a flow asks for, ready for the resolver. Holds no secrets."""

    source: str  # the file's name, for messages
    requirements: tuple[str, ...] = ()
    constraints: tuple[str, ...] = ()
    feeds: tuple[Feed, ...] = ()
    satisfied_by_image: tuple[str, ...] = field(default=(), compare=False)
    allow_local: bool = False
    base_dir: Path | None = field(default=None, compare=False)

    def digest(self) -> str:
        h = hashlib.sha256()
        for part in (self.requirements, self.constraints, tuple(f.url for f in self.feeds)):
            h.update("\n".join(part).encode())
            h.update(b"\0")
        return h.hexdigest()

    @property
    def requirements_text(self) -> str:
        return "".join(f"{r}\n" for r in self.requirements)

    @property
    def constraints_text(self) -> str:
        return "".join(f"{c}\n" for c in self.constraints)


def _is_local(spec: str) -> bool:
    """A path, a local archive or a file: URL (``pkg @ file:///x.whl`` included)."""
    s = spec.strip()
    if s.startswith("file:") or re.search(r"@\s*file:", s):
        return True
    if "://" in s:
        return False
    return s.startswith((".", "/", "~")) or s.lower().endswith(_LOCAL_SUFFIXES)


def parse_requirements(
    path: Path,
    *,
    display: str | None = None,
    allow_local: bool = False,
    image_versions: dict[str, str] | None = None,
    allow_includes: bool = True,
    root: Path | None = None,
) -> FlowRequirements:
    """Parse ``path``. ``image_versions`` (name -> version) makes refusals say what the image has.
    ``allow_includes=False`` refuses ``-r``/``-c`` (text sent over the API must not read other
    files of the server); with ``root`` (an uploaded flow's snapshot) they must stay inside it."""
    display = display or path.name
    reqs: list[str] = []
    cons: list[str] = []
    feeds: list[Feed] = []
    dropped: list[str] = []
    _read(path, display, allow_local, image_versions or {}, reqs, cons, feeds, dropped, depth=0,
          allow_includes=allow_includes, root=root.resolve() if root is not None else None)
    return FlowRequirements(
        source=display,
        requirements=tuple(reqs),
        constraints=tuple(cons),
        feeds=tuple(feeds),
        satisfied_by_image=tuple(dropped),
        allow_local=allow_local,
        base_dir=path.parent,
    )


def _read(path, display, allow_local, image_versions, reqs, cons, feeds, dropped, *, depth,
          allow_includes=True, root=None):
    if depth > 10:
        raise RequirementsError(f"{display}: -r/-c includes nest too deeply (a cycle?)",
                                hint="remove the include that leads back to an earlier file")
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise RequirementsError(
            f"requirements file {display} does not exist",
            hint="create it, or point environment.python_requirements_txt at the right file",
        ) from None
    for lineno, raw in _logical_lines(text):
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if not line:
            continue
        where = f"{display}, line {lineno}"
        if line.startswith("-"):
            _option(line, where, path, display, allow_local, image_versions,
                    reqs, cons, feeds, dropped, depth, allow_includes, root)
            continue
        if _is_local(line) and not allow_local:
            raise RequirementsError(
                f"{where}: '{line}' is a local file; requirements.txt takes packages from an index",
                hint="build local wheels into a custom image: flowsession image create NAME "
                "--from flowsession/runtime -r FILE, then set environment.image in the flow",
            )
        if _is_local(line):
            reqs.append(_absolute_local(line, path.parent))
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement as exc:
            raise RequirementsError(
                f"{where}: '{line}' is not a valid requirement ({exc})",
                hint="write a package name with an optional version, like requests>=2.31",
            ) from None
        name = canonicalize_name(req.name)
        if name in IMAGE_PROVIDED:
            if req.specifier or req.url:
                has = image_versions.get(name)
                provided = f" (it has {name} {has})" if has else ""
                raise RequirementsError(
                    f"{where}: '{line}' pins {name}, which the image provides{provided}",
                    hint=f"remove the version from {display}; for another version of {name}, "
                    "use an image version that has it (flowsession image list) or a custom image",
                )
            dropped.append(name)
            continue
        reqs.append(str(req))


def _option(line, where, path, display, allow_local, image_versions, reqs, cons, feeds, dropped,
            depth, allow_includes=True, root=None):
    head, _, rest = line.partition(" ")
    if head.startswith("--") and "=" in head:  # --index-url=URL
        head, _, value = head.partition("=")
        rest = f"{value} {rest}"
    try:
        parts = [head, *shlex.split(rest)]
    except ValueError:
        parts = [head, *rest.split()]
    opt, args = parts[0], parts[1:]
    if opt.startswith("-i") and opt != "-i":  # -ihttps://...
        opt, args = "-i", [opt[2:], *args]
    takes_value = ("-i", "--index-url", "--extra-index-url", "-r", "--requirement", "-c",
                   "--constraint")
    if opt in takes_value and not args:
        what = "a file" if opt in ("-r", "--requirement", "-c", "--constraint") else "a URL"
        raise RequirementsError(f"{where}: option '{opt}' needs {what} after it",
                                hint=f"write it as: {opt} {'FILE' if what == 'a file' else 'URL'}")
    if opt in ("-i", "--index-url", "--extra-index-url"):
        url = check_feed(args[0].rstrip("/"), where, allow_local=allow_local)
        feeds.append(Feed(url=url, primary=opt != "--extra-index-url"))
        return
    if opt in ("-r", "--requirement", "-c", "--constraint"):
        if not allow_includes:
            raise RequirementsError(f"{where}: '{opt}' includes another file, which is not "
                                    "allowed here", hint="list the packages themselves")
        if "\x00" in args[0]:
            raise RequirementsError(f"{where}: '{opt}' names a file with a NUL byte",
                                    hint="name the file without control characters")
        inc = (path.parent / args[0]).resolve()
        if root is not None and not inc.is_relative_to(root):
            raise RequirementsError(f"{where}: '{opt} {args[0]}' leads outside the uploaded flow",
                                    hint="include only files of the flow (upload them with it)")
        inc_display = f"{args[0]} (included from {display})"
        into = reqs if opt in ("-r", "--requirement") else cons
        _read(inc, inc_display, allow_local, image_versions, into, cons, feeds, dropped,
              depth=depth + 1, root=root)
        return
    if opt in ("-e", "--editable"):
        raise RequirementsError(
            f"{where}: editable installs ('{line}') are not supported in requirements.txt",
            hint="build the package into a custom image: flowsession image create NAME "
            "--from flowsession/runtime -r FILE",
        )
    if opt in ("-f", "--find-links"):
        raise RequirementsError(
            f"{where}: --find-links is not supported; packages come from an index",
            hint="serve the files from an index (-i URL) or build them into a custom image",
        )
    if opt in _IGNORED_OPTIONS:
        return
    raise RequirementsError(
        f"{where}: unknown option '{opt}'",
        hint="requirements.txt takes packages, -r/-c FILE, -i URL and --extra-index-url URL",
    )


def _absolute_local(line: str, base: Path) -> str:
    if "@" in line and "file:" in line:
        return line
    p = Path(line).expanduser()
    p = p if p.is_absolute() else (base / p).resolve()
    return str(p)


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(first physical line number, text) with backslash continuations joined. A comment line
    never continues onto the next one, whatever it ends with (as pip reads it)."""
    out: list[tuple[int, str]] = []
    pending, start = "", 0
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not pending:
            start = lineno
        if raw.lstrip().startswith("#"):
            if not pending:
                continue
            raw = ""
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        out.append((start, pending + raw))
        pending = ""
    if pending:
        out.append((start, pending))
    return out

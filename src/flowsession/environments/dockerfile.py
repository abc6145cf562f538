"""The Dockerfile Azure users already have for a prompt flow runtime, read as a custom image:

    FROM mcr.microsoft.com/azureml/promptflow/promptflow-runtime:latest
    COPY ./requirements.txt .
    RUN pip install -r requirements.txt

``FROM`` a prompt flow runtime image (or an image of this server) is the base; ``COPY`` names
files of the build context; ``RUN pip install ...`` (``-r FILE`` of a copied file, package
specs, index options; several joined by ``&&``) gives the requirements. Any other instruction,
or any other command, is refused by name and line: it has no meaning without a container.
Nothing here runs anything; the files are read only inside the Dockerfile's folder.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from flowsession.environments.images import DEFAULT_IMAGE, is_promptflow_runtime, parse_ref
from flowsession.errors import InvalidInput

_MAX_FILE = 1024 * 1024
_PIP = re.compile(r"^(?:python3?(?:\.\d+)?\s+-m\s+)?pip3?\s+install\b")
_IGNORED_PIP_FLAGS = {"--no-cache-dir", "-U", "--upgrade", "-q", "--quiet", "--user",
                      "--disable-pip-version-check", "--no-warn-script-location"}
_PIP_OPTIONS_WITH_VALUE = {"-i": "--index-url", "--index-url": "--index-url",
                           "--extra-index-url": "--extra-index-url",
                           "-f": "--find-links", "--find-links": "--find-links"}
_WHAT_TO_DO = ("keep FROM (a prompt flow runtime image), COPY of requirements files and "
               "RUN pip install ...; put system packages or other setup elsewhere")


@dataclass(frozen=True)
class DockerImage:
    base: str  # an image of this server
    requirements: str  # requirements.txt text
    note: str  # what became of the FROM line


def read_dockerfile(path: Path) -> DockerImage:
    """The image ``path`` describes, or InvalidInput naming the file, line and instruction."""
    path = Path(path).expanduser()
    try:
        text = _read(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"cannot read Dockerfile {path} ({type(exc).__name__})",
                           hint="give the path of a readable Dockerfile",
                           details={"file": str(path)}) from None
    context = path.resolve().parent
    base: str | None = None
    note = ""
    copied: dict[str, Path] = {}  # destination (as written) -> the context's file
    lines: list[str] = []
    for number, instruction, args in _instructions(text):
        where = f"{path} line {number}"
        if instruction == "FROM":
            if base is not None:
                raise _refuse(where, "a second FROM (multi-stage builds)")
            base, note = _base(where, args)
        elif base is None:
            raise _refuse(where, f"{instruction} before FROM")
        elif instruction == "COPY":
            _copy(where, args, context, copied)
        elif instruction == "RUN":
            lines.extend(_run(where, args, copied))
        else:
            raise _refuse(where, f"the {instruction} instruction")
    if base is None:
        raise InvalidInput(f"{path} has no FROM line",
                           hint="start it with FROM mcr.microsoft.com/azureml/promptflow/"
                                "promptflow-runtime:latest", details={"file": str(path)})
    return DockerImage(base=base, requirements="".join(f"{line}\n" for line in lines),
                       note=note)


def _read(path: Path) -> str:
    if path.stat().st_size > _MAX_FILE:
        raise OSError("too large")
    return path.read_text(encoding="utf-8")


def _instructions(text: str):
    """(line number, INSTRUCTION, arguments) with continuations joined and comments left out."""
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        whole = (pending + line).strip()
        pending = ""
        word, _, rest = whole.partition(" ")
        yield start, word.upper(), rest.strip()
    if pending.strip():
        word, _, rest = pending.strip().partition(" ")
        yield start, word.upper(), rest.strip()


def _refuse(where: str, what: str) -> InvalidInput:
    return InvalidInput(f"{where}: {what} cannot be turned into an image here (flowsession "
                        "images are Python environments, not containers)", hint=_WHAT_TO_DO,
                        details={"where": where})


def _base(where: str, args: str) -> tuple[str, str]:
    words = [w for w in args.split() if not w.startswith("--platform")]
    ref = words[0] if words else ""
    if len(words) not in (1, 3) or (len(words) == 3 and words[1].upper() != "AS"):
        raise InvalidInput(f"{where}: FROM needs one image", hint="FROM mcr.microsoft.com/"
                           "azureml/promptflow/promptflow-runtime:latest")
    if is_promptflow_runtime(ref):
        return DEFAULT_IMAGE, (f"FROM {ref}: prompt flow's runtime image; the image is made "
                               f"over {DEFAULT_IMAGE}, which provides promptflow")
    try:
        parse_ref(ref)
    except InvalidInput:
        raise InvalidInput(f"{where}: FROM {ref} is a container image other than prompt "
                           "flow's runtime", hint="use FROM mcr.microsoft.com/azureml/"
                           "promptflow/promptflow-runtime:latest (or an image of this server: "
                           "flowsession image list)", details={"where": where}) from None
    return ref, f"FROM {ref}"


def _copy(where: str, args: str, context: Path, copied: dict[str, Path]) -> None:
    words = [w for w in shlex.split(args) if not w.startswith("--chown")
             and not w.startswith("--chmod")]
    if any(w.startswith("--") for w in words) or len(words) < 2:
        raise _refuse(where, f"COPY {args}")
    *sources, dest = words
    for source in sources:
        found = (context / source).resolve()
        if not found.is_relative_to(context) or not found.is_file():
            raise InvalidInput(f"{where}: COPY {source}: no such file beside the Dockerfile "
                               f"({context})", hint="COPY only files of the Dockerfile's "
                               "folder (requirements files)", details={"where": where})
        name = PurePosixPath(source).name
        target = (dest.rstrip("/") + "/" + name) if dest.endswith("/") or dest in (".", "./") \
            or len(sources) > 1 else dest
        for key in {target, _norm(target), name if dest in (".", "./") else _norm(target)}:
            copied[key] = found


def _norm(path: str) -> str:
    return str(PurePosixPath(path)).lstrip("./") or "."


def _run(where: str, args: str, copied: dict[str, Path]) -> list[str]:
    out: list[str] = []
    for command in (c.strip() for c in args.split("&&")):
        if not _PIP.match(command):
            raise _refuse(where, f"RUN {command.split()[0] if command else ''} "
                                 f"(only RUN pip install ...)")
        words = shlex.split(_PIP.sub("", command))
        i = 0
        while i < len(words):
            word = words[i]
            if word in _IGNORED_PIP_FLAGS:
                i += 1
            elif word in ("-r", "--requirement"):
                if i + 1 >= len(words):
                    raise _refuse(where, f"pip install {word} without a file")
                out.extend(_copied_text(where, words[i + 1], copied).splitlines())
                i += 2
            elif word in _PIP_OPTIONS_WITH_VALUE and i + 1 < len(words):
                out.append(f"{_PIP_OPTIONS_WITH_VALUE[word]} {words[i + 1]}")
                i += 2
            elif word.startswith("-"):
                raise _refuse(where, f"pip install option {word}")
            else:
                out.append(word)
                i += 1
    return out


def _copied_text(where: str, name: str, copied: dict[str, Path]) -> str:
    found = copied.get(name) or copied.get(_norm(name)) or copied.get(PurePosixPath(name).name)
    if found is None:
        raise InvalidInput(f"{where}: pip install -r {name}: the file is not COPYed into the "
                           "image before", hint=f"add COPY {PurePosixPath(name).name} . before "
                           "this line", details={"where": where})
    return _read(found)

"""Read a prompt flow folder's ``flow.dag.yaml`` / ``flow.flex.yaml`` into a ``FlowDefinition``.

Only what flowsession needs is checked here: the ``environment:`` block (image, requirements
file), ``additional_includes``, and the shape of ``nodes`` / ``entry`` / ``inputs`` / ``outputs``.
Everything else stays in ``raw`` for prompt flow itself to judge.

Every problem becomes a ``FlowFileError`` naming the file, the 1-based line and the field, so
a user can go straight to the spot. Lines are found lazily (only when something is wrong) by
composing the YAML into PyYAML's node tree and walking it along the field path.

A flow loaded with a ``root`` (an uploaded flow: its own folder) may only include what resolves
inside that root, and its errors name its files by their path inside the flow folder, never by
where the server keeps them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import yaml

from flowsession.errors import FlowFileError, FlowNotFound, InvalidInput
from flowsession.flows.paths import check_no_nul, check_path_text, inside

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

FlowKind = Literal["dag", "flex"]
FLOW_FILE_NAMES: dict[str, tuple[str, ...]] = {
    "dag": ("flow.dag.yaml", "flow.dag.yml"),
    "flex": ("flow.flex.yaml", "flow.flex.yml"),
}
DEFAULT_REQUIREMENTS = "requirements.txt"
_ENTRY_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


@dataclass(frozen=True)
class FlowDefinition:
    """A validated flow: where it lives, which image and requirements it asks for, its shape.

    Treat the dict fields as read-only. ``requirements_path`` is resolved when the flow is
    loaded: the requirements file inside the folder, or the one an ``additional_includes``
    entry brings in under the same name; ``None`` when the default ``requirements.txt`` is
    simply absent (a flow with no extra requirements).

    ``root``: the folder everything the flow draws on (includes, symlinks, the requirements
    file) must resolve inside, and the reason its messages name files relative to its folder;
    ``None`` for a folder of the machine it is read on (prompt flow's behaviour).
    """

    folder: Path
    file: Path
    kind: FlowKind
    image: str | None = None
    requirements_file: str = DEFAULT_REQUIREMENTS
    requirements_path: Path | None = None
    additional_includes: tuple[str, ...] = ()
    entry: str | None = None
    inputs: dict[str, Any] = field(default_factory=dict, hash=False)
    outputs: dict[str, Any] = field(default_factory=dict, hash=False)
    nodes: tuple[dict[str, Any], ...] = field(default=(), hash=False)
    raw: dict[str, Any] = field(default_factory=dict, hash=False, repr=False)
    root: Path | None = None

    def show(self, path: str | os.PathLike[str]) -> str:
        """How a message names ``path``: relative to the flow folder when the flow has a root
        (an upload: the server's folders are not the user's business), else as it is."""
        return _show(Path(path), self.folder, self.root)

    def confines(self, path: str | os.PathLike[str]) -> bool:
        """May the flow draw on ``path``? Always without a root; else when it resolves inside."""
        return self.root is None or inside(self.root, path)

    def line_of(self, field_path: str) -> int | None:
        """The 1-based line of ``field_path`` (e.g. ``additional_includes[0]``) in the file."""
        try:
            return locate_line(self.file.read_text(encoding="utf-8"), field_path)
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return None

    def error(self, message: str, *, field: str | None = None, hint: str = "") -> FlowFileError:
        """A ``FlowFileError`` about this flow's file, pointing at ``field``'s line."""
        line = self.line_of(field) if field else None
        return FlowFileError(message, file=self.show(self.file), line=line, field=field,
                             hint=hint)


def _show(path: Path, folder: Path, root: Path | None) -> str:
    if root is None:
        return str(path)
    rel = os.path.relpath(os.path.abspath(path), folder)
    return Path(rel).as_posix() if not rel.startswith("..") else "(outside the flow)"


def outside_root(include: str) -> str:
    """The message for an include of an uploaded flow that leads outside it."""
    return (f"the include '{include}' is outside the uploaded flow: an uploaded flow can "
            "include only its own files")


OUTSIDE_HINT = ("upload what the flow needs with it and name it by its path inside the flow "
                "(flowsession and the SDK do this for a local flow's includes)")


# --- finding and parsing the file ------------------------------------------------------------


def load_flow(path: str | os.PathLike[str], *,
              root: str | os.PathLike[str] | None = None) -> FlowDefinition:
    """Load the flow at ``path`` (its folder, or its YAML file) and check it. With ``root``
    (an uploaded flow's own folder), its includes and requirements file must resolve inside
    ``root`` and messages name files relative to the flow folder."""
    given = Path(check_no_nul(os.fspath(path), field="flow")).expanduser()
    real_root = _root(root)
    if not given.exists():
        if real_root is not None:
            raise FlowNotFound("the flow's folder does not exist (any more)",
                               hint="upload the flow again")
        raise FlowNotFound(
            f"no flow at '{given}': the path does not exist",
            hint="check the path; it should name a flow folder or its flow.dag.yaml",
        )
    if real_root is not None and not inside(real_root, given):
        raise InvalidInput("the flow is not inside its own folder",
                           hint="upload the flow again")
    base = given.resolve() if given.is_dir() else given.resolve().parent
    flow_file, kind = _find_flow_file(given.resolve(), lambda p: _show(p, base, real_root))
    try:
        text = flow_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise FlowFileError(
            f"cannot read the file ({exc.__class__.__name__}: {reason})",
            file=_show(flow_file, flow_file.parent, real_root),
            hint="make sure the file is readable and saved as UTF-8",
        ) from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        what = exc.problem or exc.context or "invalid YAML"
        if exc.problem and exc.context:  # e.g. "... (while parsing a flow sequence, line 4)"
            ctx = exc.context_mark
            at = f", line {ctx.line + 1}" if ctx is not None and ctx.line + 1 != line else ""
            what = f"{what} ({exc.context}{at})"
        raise FlowFileError(
            f"the YAML cannot be parsed: {what}",
            file=_show(flow_file, flow_file.parent, real_root),
            line=line,
            hint="fix the YAML at that line: indentation, a missing ':' or an unquoted "
            "special character (':', '#', '{') are the usual causes",
        ) from None
    except yaml.YAMLError as exc:
        raise FlowFileError(f"the YAML cannot be parsed: {exc}",
                            file=_show(flow_file, flow_file.parent, real_root)) from None
    if kind != "flex":  # a flex flow is the one with an entry, whatever its file's name
        kind = "flex" if isinstance(data, dict) and "entry" in data else "dag"  # (as in pf)
    return _Checker(flow_file, text, kind, real_root).check(data)


def check_saved_includes(text: str, file: Path, root: Path) -> None:
    """Saving ``text`` as the flow file ``file`` of the uploaded flow at ``root``: its includes
    must stay inside the upload. (A file that does not parse yet is the user's to fix; the
    flow's next use says what is wrong.)"""
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        return
    includes = data.get("additional_includes") if isinstance(data, dict) else None
    if not isinstance(includes, list):
        return
    checker = _Checker(file, text, "dag", _root(root))
    for i, inc in enumerate(includes):
        if isinstance(inc, str) and inc.strip():
            checker.check_include(f"additional_includes[{i}]", inc.strip(), file.parent)


def _root(root: str | os.PathLike[str] | None) -> Path | None:
    """``root`` resolved; a root that is itself a symlink is refused (it could point anywhere)."""
    if root is None:
        return None
    if Path(root).is_symlink():
        raise InvalidInput("the flow's folder is a symlink", hint="upload the flow again")
    return Path(root).resolve()


def _find_flow_file(path: Path, show: Callable[[Path], str] = str
                    ) -> tuple[Path, FlowKind | None]:
    """The flow YAML for a folder or file path, and its kind (None: decide from content)."""
    if path.is_file():
        for kind in ("dag", "flex"):  # flow.dag.yaml, but also my.dag.yaml
            if path.name.endswith((f".{kind}.yaml", f".{kind}.yml")):
                return path, kind  # type: ignore[return-value]
        if path.suffix in (".yaml", ".yml"):
            return path, None
        raise FlowFileError(
            "this is not a flow file",
            file=show(path),
            hint="point at the flow's folder, or at its flow.dag.yaml / flow.flex.yaml",
        )
    found = [
        (path / n, k) for k, names in FLOW_FILE_NAMES.items() for n in names if (path / n).is_file()
    ]
    if not found:
        raise FlowFileError(
            "the flow folder has no flow.dag.yaml (or flow.flex.yaml)",
            file=show(path / "flow.dag.yaml"),
            hint="create flow.dag.yaml (or flow.flex.yaml) in it, or point at the flow's folder",
        )
    if len(found) > 1:
        names = " and ".join(p.name for p, _ in found)
        raise FlowFileError(
            f"the folder has more than one flow file ({names})",
            file=show(found[0][0]),
            hint="keep one of them, or point at the one you mean",
        )
    return found[0]  # type: ignore[return-value]


# --- locating a field's line -----------------------------------------------------------------


def _tokens(field_path: str) -> list[str | int]:
    """``nodes[1].name`` -> ``["nodes", 1, "name"]``."""
    return [
        int(t[1:-1]) if t.startswith("[") else t
        for t in re.findall(r"\[\d+\]|[^.\[\]]+", field_path)
    ]


def locate_line(text: str, field_path: str) -> int | None:
    """The 1-based line where ``field_path`` is in the YAML ``text``.

    Falls back to the nearest parent that exists (so a missing key points at its mapping).
    A key's line is the key's own line; a list item's is the item's first line.
    """
    node = yaml.compose(text, Loader=_Loader)
    if node is None:
        return None
    line = node.start_mark.line + 1
    for tok in _tokens(field_path):
        if isinstance(tok, int):
            if not isinstance(node, yaml.SequenceNode) or tok >= len(node.value):
                break
            node = node.value[tok]
            line = node.start_mark.line + 1
        else:
            if not isinstance(node, yaml.MappingNode):
                break
            hits = [
                (k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == tok
            ]
            if not hits:
                break
            key, node = hits[-1]  # PyYAML keeps the last of duplicate keys
            line = key.start_mark.line + 1
    return line


# --- validation ------------------------------------------------------------------------------

# What to do about a bad field, by field path with list indexes removed.
_HINTS = {
    "environment": "write it as 'environment:' followed by indented keys",
    "environment.image": "write e.g. 'image: flowsession/runtime:1', or remove it for the default",
    "environment.python_requirements_txt": "write e.g. 'python_requirements_txt: requirements.txt'",
    "additional_includes": "write one '- ../path' line per file or folder to include",
    "additional_includes[]": "write a path relative to the flow folder, e.g. ../requirements.txt",
    "inputs": "write each input as 'name:' with its 'type:' indented below",
    "outputs": "write each output as 'name:' with its 'reference:' indented below",
    "nodes": "write each node as a '- name: ...' item under 'nodes:'",
    "nodes[]": "give each node at least 'name:' and 'type:'",
    "nodes[].name": "give each node a 'name:' of its own",
    "nodes[].type": "add e.g. 'type: python' (or llm, prompt) to the node",
    "entry": "write 'entry: <module>:<function>', e.g. 'entry: flow:run' for run() in flow.py",
}


class _Checker:
    """Checks parsed YAML and builds the FlowDefinition; every failure names field and line."""

    def __init__(self, file: Path, text: str, kind: FlowKind, root: Path | None = None):
        self.file, self.text, self.kind, self.root = file, text, kind, root
        self.shown = _show(file, file.parent, root)

    def fail(self, field_path: str, message: str, hint: str | None = None) -> FlowFileError:
        try:
            line = locate_line(self.text, field_path)
        except yaml.YAMLError:
            line = None
        hint = hint or _HINTS.get(re.sub(r"\[\d+\]", "[]", field_path), "")
        return FlowFileError(message, file=self.shown, line=line, field=field_path, hint=hint)

    def typed(self, data: dict, key: str, kind: type, where: str | None = None) -> Any:
        """``data[key]`` if it is a ``kind`` (``None`` when absent), else a FlowFileError."""
        value = data.get(key)
        if value is not None and not isinstance(value, kind):
            article = {dict: "a mapping", list: "a list", str: "a string"}[kind]
            raise self.fail(where or key, f"must be {article}, not {_kind_of(value)}")
        return value

    def check(self, data: Any) -> FlowDefinition:
        if not isinstance(data, dict):
            what = "empty" if data is None else f"{_kind_of(data)}, not a mapping"
            raise FlowFileError(
                f"the flow file is {what}",
                file=self.shown,
                line=None if data is None else 1,
                hint="a flow file is a mapping with keys like inputs, outputs, nodes, environment",
            )
        env = self.typed(data, "environment", dict) or {}
        image = self.typed(env, "image", str, "environment.image")
        if image is not None and not image.strip():
            raise self.fail("environment.image", "must be a non-empty image name")
        req = self.typed(env, "python_requirements_txt", str, "environment.python_requirements_txt")
        if req is not None and not req.strip():
            raise self.fail("environment.python_requirements_txt", "must be a file name")
        includes = self.typed(data, "additional_includes", list) or []
        for i, inc in enumerate(includes):
            if not isinstance(inc, str) or not inc.strip():
                raise self.fail(f"additional_includes[{i}]", "must be a path (a string)")
        includes = tuple(inc.strip() for inc in includes)
        folder = self.file.parent
        for i, inc in enumerate(includes):
            self.check_include(f"additional_includes[{i}]", inc, folder)
        return FlowDefinition(
            folder=folder,
            file=self.file,
            kind=self.kind,
            image=image.strip() if image else None,
            requirements_file=req.strip() if req else DEFAULT_REQUIREMENTS,
            requirements_path=self.requirements_path(folder, req, includes),
            additional_includes=includes,
            entry=self.check_entry(data.get("entry")) if self.kind == "flex" else None,
            inputs=self.typed(data, "inputs", dict) or {},
            outputs=self.typed(data, "outputs", dict) or {},
            nodes=self.check_nodes(data) if self.kind == "dag" else (),
            raw=data,
            root=self.root,
        )

    def check_include(self, field_path: str, include: str, folder: Path) -> None:
        """An include is a path; an uploaded flow's stays inside the upload."""
        check = check_path_text if self.root is not None else check_no_nul
        try:
            check(include, field=field_path, what="include")
        except InvalidInput as exc:
            raise self.fail(field_path, exc.message.removeprefix(f"{field_path}: "),
                            exc.hint) from None
        if self.root is not None and not inside(self.root, folder / include):
            raise self.fail(field_path, outside_root(include), OUTSIDE_HINT)

    def check_nodes(self, data: dict) -> tuple[dict, ...]:
        nodes = self.typed(data, "nodes", list) or []
        seen: dict[str, int] = {}
        for i, node in enumerate(nodes):
            if not isinstance(node, dict):
                raise self.fail(f"nodes[{i}]", f"must be a mapping, not {_kind_of(node)}")
            name = node.get("name")
            if not isinstance(name, str) or not name.strip():
                raise self.fail(f"nodes[{i}].name", "every node needs a 'name' (a string)")
            if name in seen:
                raise self.fail(
                    f"nodes[{i}].name",
                    f"node name '{name}' is already used by nodes[{seen[name]}]",
                    "give each node a unique name",
                )
            seen[name] = i
            if not node.get("use_variants") and not isinstance(node.get("type"), str):
                raise self.fail(f"nodes[{i}].type", f"node '{name}' needs a 'type' (a string)")
        return tuple(nodes)

    def check_entry(self, entry: Any) -> str:
        if entry is None:
            raise self.fail("entry", "a flex flow needs an 'entry'")
        if not isinstance(entry, str) or not _ENTRY_RE.match(entry.strip()):
            raise self.fail(
                "entry", f"'{entry}' is not of the form module:function or module:Class"
            )
        return entry.strip()

    def requirements_path(self, folder: Path, req: str | None, includes: tuple[str, ...]):
        """The requirements file, in the folder or brought in by an include of the same name."""
        name = (req or DEFAULT_REQUIREMENTS).strip()
        field_path = "environment.python_requirements_txt"
        rel = PurePosixPath(name.replace("\\", "/"))
        if rel.is_absolute() or ".." in rel.parts:
            raise self.fail(
                field_path,
                f"'{name}' is outside the flow folder",
                f"list it in additional_includes (e.g. '- {name}') and name it here by "
                f"its file name '{rel.name}'",
            )
        if (folder / rel).is_file():
            return self.confined(field_path, name, folder / rel)
        for inc in includes:  # "requirements.txt" brought in by "- ../requirements.txt"
            if rel.parts and include_name(inc) == rel.parts[0]:
                via = (folder / inc).joinpath(*rel.parts[1:])
                if via.is_file():
                    return self.confined(field_path, name, via.resolve())
        if req is None:
            return None  # the default file is optional
        where = "the flow folder" if self.root is not None else str(folder)
        raise self.fail(
            field_path,
            f"the requirements file '{name}' does not exist in {where}",
            f"create {name} in the flow folder, fix the name, or bring it in with "
            "additional_includes",
        )

    def confined(self, field_path: str, name: str, path: Path) -> Path:
        """``path`` of the requirements file, when the flow may draw on it."""
        if self.root is not None and not inside(self.root, path):
            raise self.fail(field_path, f"the requirements file '{name}' leads outside the "
                            "uploaded flow", OUTSIDE_HINT)
        return path


def replace_includes(text: str, new: dict[int, str]) -> str:
    """The flow file ``text`` with ``additional_includes[i]`` replaced by ``new[i]``; every
    other character (comments, order, quoting) is kept."""
    node = yaml.compose(text, Loader=yaml.SafeLoader)  # its marks count characters
    items = None
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value == "additional_includes":
                items = value
    if not isinstance(items, yaml.SequenceNode):
        raise ValueError("the flow file has no list of additional_includes")
    spans = sorted(((items.value[i].start_mark.index, items.value[i].end_mark.index, path)
                    for i, path in new.items()), reverse=True)
    for start, end, path in spans:  # from the end, so earlier positions stay right
        text = text[:start] + json.dumps(path, ensure_ascii=False) + text[end:]
    return text


def include_name(include: str) -> str:
    """The name an ``additional_includes`` entry gets at the snapshot root (its base name)."""
    return os.path.basename(os.path.normpath(include.replace("\\", "/")))


def _kind_of(value: Any) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "true/false"}
    return names.get(type(value), "a number" if isinstance(value, int | float) else "a value")

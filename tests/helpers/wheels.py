"""Build tiny, valid pure-python wheels with the standard library only.

Used by tests that install packages with ``uv`` from a local index
(:mod:`tests.helpers.index_server`), so that no network access is needed.
"""

from __future__ import annotations

import base64
import hashlib
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = [
    "PackageSet",
    "build_wheel",
    "import_name",
    "project_name",
    "wheel_dist_name",
    "wheel_filename",
]

_GENERATOR = "flowsession-tests (0.1)"
# Fixed timestamp so that the same inputs give byte-identical wheels.
_ZIP_DATE = (2020, 1, 1, 0, 0, 0)


def wheel_dist_name(name: str) -> str:
    """Distribution name as it appears in wheel filenames and ``.dist-info`` dirs.

    Binary distribution format spec: ``re.sub(r"[-_.]+", "_", name).lower()``.
    """
    return re.sub(r"[-_.]+", "_", name).lower()


def project_name(name: str) -> str:
    """PEP 503 normalized project name (``My.Pkg_x`` -> ``my-pkg-x``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def import_name(name: str) -> str:
    """Default top-level module name for a distribution (``tiny-pkg`` -> ``tiny_pkg``)."""
    return re.sub(r"[-.]+", "_", name).lower()


def wheel_filename(name: str, version: str) -> str:
    return f"{wheel_dist_name(name)}-{version}-py3-none-any.whl"


def _record_hash(data: bytes) -> str:
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _metadata(
    name: str, version: str, requires: Sequence[str], requires_python: str | None
) -> str:
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    if requires_python:
        lines.append(f"Requires-Python: {requires_python}")
    lines.extend(f"Requires-Dist: {req}" for req in requires)
    return "\n".join(lines) + "\n"


def _wheel_file() -> str:
    return (
        "Wheel-Version: 1.0\n"
        f"Generator: {_GENERATOR}\n"
        "Root-Is-Purelib: true\n"
        "Tag: py3-none-any\n"
    )


def build_wheel(
    out_dir: Path,
    name: str,
    version: str,
    *,
    requires: Sequence[str] = (),
    modules: Mapping[str, str] | None = None,
    requires_python: str | None = None,
) -> Path:
    """Write ``{dist}-{version}-py3-none-any.whl`` into *out_dir* and return its path.

    *modules* maps archive paths (e.g. ``"tinypkg/__init__.py"``) to file contents;
    by default the wheel holds ``{import_name}/__init__.py`` with
    ``__version__ = "{version}"``. *requires* become ``Requires-Dist`` lines.
    """
    if isinstance(requires, str):  # a lone string would be split into characters
        raise TypeError("requires must be a sequence of requirement strings, not a str")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dist = wheel_dist_name(name)
    dist_info = f"{dist}-{version}.dist-info"
    if modules is None:
        modules = {f"{import_name(name)}/__init__.py": f'__version__ = "{version}"\n'}

    files: list[tuple[str, bytes]] = []
    for arcname, content in modules.items():
        arcname = arcname.replace("\\", "/").lstrip("/")
        if arcname.startswith(dist_info + "/"):
            raise ValueError(f"module path {arcname!r} collides with the .dist-info directory")
        files.append((arcname, content.encode("utf-8")))
    files.append(
        (f"{dist_info}/METADATA", _metadata(name, version, requires, requires_python).encode())
    )
    files.append((f"{dist_info}/WHEEL", _wheel_file().encode()))

    record_path = f"{dist_info}/RECORD"
    record_lines = [f"{arc},{_record_hash(data)},{len(data)}" for arc, data in files]
    record_lines.append(f"{record_path},,")
    files.append((record_path, ("\n".join(record_lines) + "\n").encode()))

    path = out_dir / wheel_filename(name, version)
    tmp = path.with_name(path.name + ".part")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for arcname, data in files:
            info = zipfile.ZipInfo(arcname, date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)
    # Atomic rename: an index server re-scanning the directory never sees half a wheel
    # (its scan only looks at ``*.whl``).
    tmp.replace(path)
    return path


class PackageSet:
    """Collects wheels in one directory, e.g. the directory a ``LocalIndex`` serves.

    >>> pkgs = PackageSet(tmp_path / "wheels")
    >>> pkgs.add("a", "1.0", requires=["b>=1"]).add("b", "1.0")
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.wheels: list[Path] = []

    def add(
        self,
        name: str,
        version: str,
        *,
        requires: Sequence[str] = (),
        modules: Mapping[str, str] | None = None,
        requires_python: str | None = None,
    ) -> PackageSet:
        self.wheels.append(
            build_wheel(
                self.directory,
                name,
                version,
                requires=requires,
                modules=modules,
                requires_python=requires_python,
            )
        )
        return self

    def __iter__(self):
        return iter(self.wheels)

    def __len__(self) -> int:
        return len(self.wheels)

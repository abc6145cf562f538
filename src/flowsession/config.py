"""Settings, read once from the environment (``FLOWSESSION_*``), with defaults that need no set-up.

Everything lives under one home directory (``FLOWSESSION_HOME``, default
``$XDG_DATA_HOME/flowsession`` or ``~/.local/share/flowsession``): the SQLite database, images,
environments, snapshots and build logs.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from flowsession.errors import InvalidInput

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def parse_size(text: str, *, name: str = "size") -> int:
    """'20GB', '500M', '1.5GiB', '1048576' -> bytes."""
    m = _SIZE.match(text)
    if not m:
        raise InvalidInput(
            f"{name}: cannot read {text!r} as a size", hint="write it like 20GB, 500MB or 1048576"
        )
    unit = (m.group(2) or "").upper()
    factor = _UNITS[unit[:1]] if unit else 1
    if "I" in unit:
        factor = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit[0]]
    return int(float(m.group(1)) * factor)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|hr|hours?|minutes?|seconds?|d|days?)?\s*$",
                       re.IGNORECASE)


def parse_duration(text: str, *, name: str = "duration") -> float:
    """'90', '90s', '30m', '2h', '1d' -> seconds. A bare number is minutes (as idle times are
    given in the reference documents)."""
    m = _DURATION.match(str(text))
    if not m:
        raise InvalidInput(f"{name}: cannot read {text!r} as a duration",
                           hint="write it like 30m, 2h, 90s or 1d (a bare number is minutes)")
    unit = (m.group(2) or "m").lower()[0]
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]


def format_duration(seconds: float) -> str:
    if seconds <= 0:
        return "never"
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n and seconds % n == 0:
            return f"{seconds / n:g}{unit}"
    return f"{seconds:g}s"


def _number(text: str, name: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InvalidInput(f"{name}: {text!r} is not a number") from None


def format_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _default_home() -> Path:
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "flowsession"


def _default_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid{os.getuid()}"


def _default_uv() -> str:
    try:
        from uv import find_uv_bin

        return find_uv_bin()
    except (ImportError, FileNotFoundError):
        return "uv"


@dataclass(frozen=True)
class Settings:
    home: Path = field(default_factory=_default_home)
    database_url: str | None = None
    # Built images may live outside the home, shared by several homes (read-mostly).
    images_path: Path | None = None
    uv: str = field(default_factory=_default_uv)
    # The index used for flows' requirements; None means uv's own default (PyPI or UV_INDEX_URL).
    index_url: str | None = None
    # The interpreter images are built with (a version request or a path, as uv understands).
    python: str = f"{sys.version_info.major}.{sys.version_info.minor}"
    env_disk_budget: int = 20 * 10**9
    failed_build_memory_seconds: float = 30.0
    # Who is using this control plane (the API's tokens replace this on a server).
    user: str = field(default_factory=_default_user)
    vm_sizes_file: Path | None = None
    default_vm_size: str = "medium"
    # None: the backend's default (local: derived from this machine, see computes.sizes)
    vcpu_quota: float | None = None
    idle_timeout_s: float = 3600.0  # sessions; runs from the CLI or SDK get one hour too
    standby_pool_size: int = 1
    # Where sessions' directories and sockets live: short, private, per home.
    runtime_path: Path | None = None
    # The largest request body the API takes (an upload, a run's inline data): 413 beyond.
    max_body: int = 64 * 10**6
    # The compute backend sessions run on: a name of ``backends.compute.registry``.
    backend: str = "local"
    # The Ray cluster of the ray backend ("host:port" of its GCS), and the namespace of its
    # sessions' actors and placement groups (one per control plane).
    ray_address: str | None = None
    ray_namespace: str = "flowsession"
    # On a Ray node: where sessions' images, environments, snapshots and slots live.
    node_home_path: Path | None = None

    @classmethod
    def from_env(cls, environ: os._Environ[str] | dict[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        s = cls()
        if v := env.get("FLOWSESSION_HOME"):
            s = replace(s, home=Path(v).expanduser())
        if v := env.get("FLOWSESSION_DATABASE_URL"):
            s = replace(s, database_url=v)
        if v := env.get("FLOWSESSION_IMAGES_DIR"):
            s = replace(s, images_path=Path(v).expanduser())
        if v := env.get("FLOWSESSION_UV"):
            s = replace(s, uv=v)
        if v := env.get("FLOWSESSION_INDEX_URL"):
            s = replace(s, index_url=v)
        if v := env.get("FLOWSESSION_PYTHON"):
            s = replace(s, python=v)
        if v := env.get("FLOWSESSION_USER"):
            s = replace(s, user=v)
        if v := env.get("FLOWSESSION_VM_SIZES"):
            s = replace(s, vm_sizes_file=Path(v).expanduser())
        if v := env.get("FLOWSESSION_DEFAULT_VM_SIZE"):
            s = replace(s, default_vm_size=v)
        if v := env.get("FLOWSESSION_VCPU_QUOTA"):
            s = replace(s, vcpu_quota=_number(v, "FLOWSESSION_VCPU_QUOTA"))
        if v := env.get("FLOWSESSION_IDLE_TIMEOUT"):
            s = replace(s, idle_timeout_s=parse_duration(v, name="FLOWSESSION_IDLE_TIMEOUT"))
        if v := env.get("FLOWSESSION_STANDBY_POOL"):
            s = replace(s, standby_pool_size=int(_number(v, "FLOWSESSION_STANDBY_POOL")))
        if v := env.get("FLOWSESSION_RUNTIME_DIR"):
            s = replace(s, runtime_path=Path(v))
        if v := env.get("FLOWSESSION_ENV_DISK_BUDGET"):
            s = replace(s, env_disk_budget=parse_size(v, name="FLOWSESSION_ENV_DISK_BUDGET"))
        if v := env.get("FLOWSESSION_MAX_BODY"):
            s = replace(s, max_body=parse_size(v, name="FLOWSESSION_MAX_BODY"))
        if v := env.get("FLOWSESSION_BACKEND"):
            s = replace(s, backend=v.strip())
        if v := env.get("FLOWSESSION_RAY_ADDRESS"):
            s = replace(s, ray_address=v.strip())
        if v := env.get("FLOWSESSION_RAY_NAMESPACE"):
            s = replace(s, ray_namespace=v.strip())
        if v := env.get("FLOWSESSION_NODE_HOME"):
            s = replace(s, node_home_path=Path(v).expanduser())
        return s

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'flowsession.db'}"

    @property
    def images_dir(self) -> Path:
        return self.images_path or self.home / "images"

    @property
    def envs_dir(self) -> Path:
        return self.home / "envs"

    @property
    def flows_dir(self) -> Path:
        """Uploaded flows: ``<flows_dir>/<owner>/<name>/``."""
        return self.home / "flows"

    @property
    def snapshots_dir(self) -> Path:
        return self.home / "snapshots"

    @property
    def runs_dir(self) -> Path:
        """Each run's files: inputs, collected results, outputs, metrics, logs."""
        return self.home / "runs"

    @property
    def salvage_dir(self) -> Path:
        """Run files rescued from a session's folder when the session went away."""
        return self.home / "run-salvage"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def runtime_dir(self) -> Path:
        """Sessions' slots (flow copy, working dir, socket). Kept short: socket paths are
        limited to 107 bytes."""
        if self.runtime_path:
            return self.runtime_path
        key = hashlib.sha256(str(self.home.resolve()).encode()).hexdigest()[:8]
        return Path(tempfile.gettempdir()) / f"flowsession-{os.getuid()}" / key

    @property
    def node_home(self) -> Path:
        """A cluster node's own home (the Ray backend's session actors keep their images,
        environments, snapshots and build logs there): never the control plane's."""
        return self.node_home_path or self.home / "node"

    @property
    def secret_key_file(self) -> Path:
        return self.home / "secret.key"

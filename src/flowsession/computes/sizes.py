"""The VM size catalog and the workspace vCPU quota."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

from flowsession.backends.compute.base import VmSize
from flowsession.config import format_size
from flowsession.errors import InvalidInput, QuotaExceeded


def load_catalog(path: Path | None = None) -> dict[str, VmSize]:
    """Sizes from ``path`` (or the catalog shipped with flowsession), in file order."""
    try:
        text = (path.read_text() if path else
                (resources.files("flowsession.computes") / "vm_sizes.toml").read_text())
        data = tomllib.loads(text)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InvalidInput(f"VM size catalog {path}: {exc}",
                           hint="fix FLOWSESSION_VM_SIZES or unset it for the built-in catalog")
    catalog = {}
    for name, spec in data.items():
        try:
            catalog[name] = VmSize(name=name, vcpu=float(spec["vcpu"]),
                                   memory_bytes=int(float(spec["memory_gb"]) * 10**9),
                                   description=str(spec.get("description", "")))
        except (KeyError, TypeError, ValueError):
            raise InvalidInput(f"VM size catalog {path or 'vm_sizes.toml'}: size '{name}' needs "
                               "numbers vcpu and memory_gb") from None
    return catalog


def lookup(catalog: dict[str, VmSize], name: str) -> VmSize:
    size = catalog.get(name) or next(
        (s for n, s in catalog.items() if n.lower() == name.lower()), None)
    if size is None:
        raise InvalidInput(f"VM size '{name}' is not in the catalog",
                           hint="see the sizes with: flowsession compute sizes")
    return size


VCPU_PER_CORE = 8  # local sessions mostly wait on LLM endpoints: a VM size's vCPUs are a
#                    cgroup ceiling, not a reservation, so the machine's cores are shared
FALLBACK_QUOTA = 16.0  # other backends, unless FLOWSESSION_VCPU_QUOTA says


def machine_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_quota(backend: str) -> tuple[float, str]:
    """The vCPU quota when FLOWSESSION_VCPU_QUOTA is not set, and how it was found."""
    if backend == "local":
        cores = machine_cores()
        return (float(VCPU_PER_CORE * cores),
                f"local backend: {VCPU_PER_CORE} vCPU per core of this machine's {cores}; "
                "FLOWSESSION_VCPU_QUOTA sets another")
    return FALLBACK_QUOTA, f"{backend} backend default; FLOWSESSION_VCPU_QUOTA sets another"


def quota_of(vcpu_quota: float | None, backend: str) -> tuple[float, str]:
    if vcpu_quota is not None:
        return float(vcpu_quota), "set by FLOWSESSION_VCPU_QUOTA"
    return default_quota(backend)


def smallest(catalog: dict[str, VmSize]) -> VmSize:
    return min(catalog.values(), key=lambda s: (s.vcpu, s.memory_bytes))


def check_fits(size: VmSize, *, quota: float, in_use: float) -> None:
    if in_use + size.vcpu > quota:
        raise QuotaExceeded(
            f"VM size {size.name} needs {size.vcpu:g} vCPU but only {max(quota - in_use, 0):g} "
            f"of the workspace quota of {quota:g} vCPU is free ({in_use:g} in use)",
            hint="stop a session or compute you no longer need, or pick a smaller size "
            "(flowsession compute sizes)")


def pick_default(catalog: dict[str, VmSize], preferred: str, *, quota: float,
                 in_use: float) -> VmSize:
    """The preferred size if it fits the quota, else the smallest size that does."""
    candidates: Iterable[VmSize] = [lookup(catalog, preferred),
                                    *sorted(catalog.values(), key=lambda s: (s.vcpu, s.memory_bytes))]
    for size in candidates:
        if in_use + size.vcpu <= quota:
            return size
    smallest = min(catalog.values(), key=lambda s: s.vcpu)
    check_fits(smallest, quota=quota, in_use=in_use)  # raises with the figures
    return smallest


def describe(size: VmSize) -> str:
    return f"{size.name} ({size.vcpu:g} vCPU, {format_size(size.memory_bytes)})"

"""Compute backends by name: ``FLOWSESSION_BACKEND`` chooses one.

A name is found, in order: among the built-in backends (``local``, ``ray``); among the entry
points of the group ``flowsession.compute_backends`` (a third backend's own distribution
declares ``name = "package.module:Class"`` there); or as ``package.module:Class`` given
directly. So a new backend needs no change outside its own module. A backend is a class taking
the settings (``Backend(settings)``); its module is imported only when it is chosen (``ray``
costs a second to import, and is an optional extra).
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from flowsession.backends.compute.base import ComputeBackend
from flowsession.config import Settings
from flowsession.errors import InvalidInput

GROUP = "flowsession.compute_backends"
BUILTIN = {
    "local": "flowsession.backends.compute.local:LocalBackend",
    "ray": "flowsession.backends.compute.ray:RayBackend",
}


def names() -> list[str]:
    """Every backend name this installation knows."""
    return sorted({*BUILTIN, *(ep.name for ep in entry_points(group=GROUP))})


def target(name: str) -> str:
    """``module:Class`` of the backend called ``name``."""
    if name in BUILTIN:
        return BUILTIN[name]
    for ep in entry_points(group=GROUP):
        if ep.name == name:
            return ep.value
    if ":" in name:
        return name
    raise InvalidInput(f"FLOWSESSION_BACKEND={name!r} is not a compute backend here "
                       f"(known: {', '.join(names())})",
                       hint="set FLOWSESSION_BACKEND to one of them, or to package.module:Class")


def backend_class(name: str) -> type:
    module_name, _, attr = target(name).partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InvalidInput(f"compute backend {name!r} cannot be loaded: {exc}",
                           hint="install what it needs (the ray backend: "
                                "pip install 'flowsession[ray]')") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise InvalidInput(f"compute backend {name!r}: {module_name} has no {attr}") from None


def create(settings: Settings, name: str | None = None) -> ComputeBackend:
    """The backend ``name`` (default: the settings'), made for ``settings``."""
    return backend_class(name or settings.backend)(settings)

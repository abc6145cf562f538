"""The state of an image or an environment: defined, built once, then used. Pure."""

from __future__ import annotations

from enum import StrEnum


class BuildState(StrEnum):
    DEFINED = "DEFINED"  # an image that is known and not built yet (environments start building)
    BUILDING = "BUILDING"
    READY = "READY"
    FAILED = "FAILED"  # an environment's failure is remembered briefly, then built again
    REMOTE = "REMOTE"  # an environment built where its sessions run (a Ray node), not here

"""An operation's status as the API sends it; a plain value the client reads too."""

from __future__ import annotations

from enum import StrEnum


class OperationStatus(StrEnum):
    """An operation's status; an ended one's is also its last event (``{"event": ...}``)."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


ENDED = frozenset({OperationStatus.SUCCEEDED, OperationStatus.FAILED})

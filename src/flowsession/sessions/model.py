"""A session's record as a plain value, and its id's form: what the store keeps and the
client reads back. No store or SQLAlchemy here, so the CLI and SDK can use them cheaply."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flowsession.backends.compute.base import SessionHandle

SESSION_ID = re.compile(r"^ses-[0-9a-f]{10}$")  # what ``new_session_id`` makes


def new_session_id() -> str:
    return f"ses-{uuid.uuid4().hex[:10]}"


def looks_like_session_id(text: str) -> bool:
    return bool(SESSION_ID.match(text))


@dataclass(frozen=True)
class Session:
    id: str
    flow: str
    owner: str
    state: str
    compute_type: str
    compute_id: str | None
    vm_size: str | None
    image: str | None
    identity: str
    idle_timeout_s: float
    env_id: str | None
    snapshot_id: str | None
    handle: str | None
    operator: str | None
    reason: str | None
    created_at: float
    updated_at: float
    last_activity_at: float

    @property
    def session_handle(self) -> SessionHandle | None:
        from flowsession.backends.compute.base import SessionHandle  # the server's side only

        return SessionHandle.from_json(json.loads(self.handle)) if self.handle else None

    @property
    def flow_missing(self) -> bool:
        """Is the flow's folder gone (deleted or moved)? The session runs on regardless (it
        has its own snapshot), can be shown and stopped, but not reset or installed."""
        return not Path(self.flow).is_dir()

    @property
    def holder(self) -> str:
        """The name this session holds its environment under."""
        return f"session:{self.id}"

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        handle = self.session_handle
        d.pop("handle")
        d.pop("operator")
        d["sandbox"] = handle.sandbox_detail if handle else None
        d["limits"] = handle.limits_detail if handle else None
        d["pid"] = handle.pid if handle else None
        d["from_standby"] = handle.from_standby if handle else None
        d["flow_missing"] = self.flow_missing
        return d

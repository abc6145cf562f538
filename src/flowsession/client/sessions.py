"""The ``Client``'s sessions: by flow (``/api/flows/NAME/session``), and by id
(``/api/sessions/ID``: whatever became of the flow's folder). Both are the same resource at
two addresses, so each operation is written once, for a path."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flowsession.client.http import SUBMIT_TIMEOUT_S, Http, Progress, ServerSession, q
from flowsession.client.http import session_from_dict as _session


class Sessions:
    """Mixed into ``Client``; uses its ``_flow_name`` (``Flows``)."""

    _http: Http

    def test(self, flow: str | Path, inputs: Mapping[str, Any] | None = None,
             *, timeout: float = 600, init: Mapping[str, Any] | None = None
             ) -> dict[str, Any]:
        """One line on the flow's session (started if none runs): its outputs. ``init``: a
        flex flow class's ``__init__`` arguments."""
        answer = self._http.request(
            "POST", f"/api/flows/{self._flow_name(flow)}/test",
            json={"inputs": dict(inputs or {}), "timeout": timeout, "init": dict(init or {})},
            timeout=timeout + SUBMIT_TIMEOUT_S)
        return answer["outputs"]

    def start_session(self, flow: str | Path, *, on_progress: Progress = None,
                      **options: Any) -> ServerSession:
        """Start the flow's session; options: compute_type, vm_size, instance,
        idle_time ('30m', or idle_timeout_s in seconds), identity, image.
        ``on_progress(event)`` is called with the operation's progress events
        (``{"event": "progress", "message": ...}``)."""
        if "idle_timeout_s" in options:
            idle = options.pop("idle_timeout_s")
            if idle is not None:
                options["idle_time"] = f"{idle:g}s"
        body = {k: v for k, v in options.items() if v is not None}
        return _session(self._http.operation("POST", self._flow_session(flow, upload=True),
                                             json=body, on_progress=on_progress))

    def list_sessions(self, *, all: bool = False) -> list[ServerSession]:
        """Your sessions (every user's if you manage everything); ``all``: stopped ones too."""
        return [_session(d) for d in self._http.request(
            "GET", "/api/sessions", params={"all": "true" if all else "false"})]

    # --- by flow ---------------------------------------------------------------------------

    def get_session(self, flow: str | Path) -> ServerSession:
        return self._show(self._flow_session(flow))

    def session_events(self, flow: str | Path) -> list[dict[str, Any]]:
        """The state changes of the flow's sessions: ``session_id``, ``at``, ``actor``,
        ``from_state``, ``to_state``, ``reason``."""
        return self._http.request("GET", f"{self._flow_session(flow)}/events")

    def session_packages(self, flow: str | Path) -> list[dict[str, Any]]:
        """The running session's packages: ``name``, ``version``, ``origin``."""
        return self._http.request("GET", f"{self._flow_session(flow)}/packages")

    def stop_session(self, flow: str | Path) -> ServerSession:
        return self._stop(self._flow_session(flow))

    def install(self, flow: str | Path, *, on_progress: Progress = None) -> ServerSession:
        """Save and install: the flow's requirements into a new environment for its running
        session, switched to only when it works. Returns the session."""
        return self._install(self._flow_session(flow, upload=True), on_progress)

    def reset_session(self, flow: str | Path, *, on_progress: Progress = None
                      ) -> ServerSession:
        """Delete and recreate the session with the same settings."""
        return self._reset(self._flow_session(flow), on_progress)

    def update_session(self, flow: str | Path, *, idle_time: str | None = None,
                       vm_size: str | None = None, instance: str | None = None,
                       identity: str | None = None) -> ServerSession:
        """Change the session's settings: ``idle_time`` and ``identity`` in place;
        ``vm_size`` or ``instance`` reset it onto the new compute."""
        return self._update(self._flow_session(flow), idle_time=idle_time, vm_size=vm_size,
                            instance=instance, identity=identity)

    # --- by id: whatever became of the flow's folder ---------------------------------------

    def get_session_by_id(self, session_id: str) -> ServerSession:
        """The session ``session_id`` (``ses-...``): yours, or anyone's if you manage
        everything; ``flow_missing`` says whether its flow's folder is gone."""
        return self._show(_by_id(session_id))

    def session_events_by_id(self, session_id: str) -> list[dict[str, Any]]:
        """The session's own state changes (``session_events`` has the flow's every session)."""
        return self._http.request("GET", f"{_by_id(session_id)}/events")

    def session_packages_by_id(self, session_id: str) -> list[dict[str, Any]]:
        return self._http.request("GET", f"{_by_id(session_id)}/packages")

    def session_logs(self, session_id: str, *, tail_bytes: int = 64 * 1024) -> str:
        """The end of the session's supervisor and worker log (at most ``tail_bytes``)."""
        return self._http.request("GET", f"{_by_id(session_id)}/logs",
                                  params={"tail_bytes": tail_bytes})["text"]

    def stop_session_by_id(self, session_id: str) -> ServerSession:
        """Stop the session and release its compute; never needs the flow's folder."""
        return self._stop(_by_id(session_id))

    def reset_session_by_id(self, session_id: str, *, on_progress: Progress = None
                            ) -> ServerSession:
        """Reset the session (its flow's folder must still be there)."""
        return self._reset(_by_id(session_id), on_progress)

    def install_by_id(self, session_id: str, *, on_progress: Progress = None
                      ) -> ServerSession:
        """Save and install what the session's flow folder's requirements now say."""
        return self._install(_by_id(session_id), on_progress)

    def update_session_by_id(self, session_id: str, *, idle_time: str | None = None,
                             vm_size: str | None = None, instance: str | None = None,
                             identity: str | None = None) -> ServerSession:
        return self._update(_by_id(session_id), idle_time=idle_time, vm_size=vm_size,
                            instance=instance, identity=identity)

    # --- each operation once, for a session's path -----------------------------------------

    def _flow_session(self, flow: str | Path, *, upload: bool = False) -> str:
        return f"/api/flows/{self._flow_name(flow, upload=upload)}/session"

    def _show(self, path: str) -> ServerSession:
        return _session(self._http.request("GET", path))

    def _stop(self, path: str) -> ServerSession:
        return _session(self._http.long("POST", f"{path}/stop"))

    def _reset(self, path: str, on_progress: Progress) -> ServerSession:
        return _session(self._http.operation("POST", f"{path}/reset", on_progress=on_progress))

    def _install(self, path: str, on_progress: Progress) -> ServerSession:
        return _session(self._http.operation("POST", f"{path}/install",
                                             on_progress=on_progress))

    def _update(self, path: str, **changes: str | None) -> ServerSession:
        body = {k: v for k, v in changes.items() if v is not None}
        return _session(self._http.request("PATCH", path, json=body, timeout=SUBMIT_TIMEOUT_S))


def _by_id(session_id: str) -> str:
    return f"/api/sessions/{q(session_id)}"

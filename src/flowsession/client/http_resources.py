"""The HTTP transport's methods for the server's other resources: sessions by id, computes,
images, environments, connections, feed secrets, managed identities, and users, tokens, roles
and the audit log. (``HttpTransport`` in ``http.py`` holds the requests, flows, flows' sessions
and runs.)"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from flowsession.access.secrets import USER_IDENTITY
from flowsession.errors import InvalidInput

Progress = Callable[[dict[str, Any]], None] | None
LONG_S = 120.0


def _q(part: str) -> str:
    """One path segment, escaped."""
    return quote(part, safe="")


class HttpResources:
    """Mixed into ``HttpTransport``: uses its ``request``, ``wait_operation``, ``flow_name``."""

    # --- sessions by id: whatever became of the flow's folder -------------------------------

    def get_flow(self, name: str) -> dict[str, Any]:
        return self.request("GET", f"/api/flows/{_q(name)}")

    def _session(self, method: str, session_id: str, tail: str = "", **kwargs: Any) -> Any:
        return self.request(method, f"/api/sessions/{_q(session_id)}{tail}", **kwargs)

    def get_session_by_id(self, session_id: str):
        from flowsession.client.http import session_from_dict

        return session_from_dict(self._session("GET", session_id))

    def session_events_by_id(self, session_id: str) -> list[dict[str, Any]]:
        return self._session("GET", session_id, "/events")

    def session_packages_by_id(self, session_id: str) -> list[dict[str, Any]]:
        return self._session("GET", session_id, "/packages")

    def session_logs(self, session_id: str, *, tail_bytes: int) -> str:
        return self._session("GET", session_id, "/logs",
                             params={"tail_bytes": tail_bytes})["text"]

    def stop_session_by_id(self, session_id: str):
        from flowsession.client.http import session_from_dict

        return session_from_dict(self._session("POST", session_id, "/stop",
                                               timeout=max(self.timeout, LONG_S)))

    def reset_session_by_id(self, session_id: str, *, on_progress: Progress = None):
        from flowsession.client.http import session_from_dict

        op = self._session("POST", session_id, "/reset")
        return session_from_dict(self.wait_operation(op["id"], on_event=on_progress))

    def install_by_id(self, session_id: str, *, on_progress: Progress = None):
        from flowsession.client.http import session_from_dict

        op = self._session("POST", session_id, "/install")
        return session_from_dict(self.wait_operation(op["id"], on_event=on_progress))

    def update_session_by_id(self, session_id: str, changes: dict[str, Any]):
        from flowsession.client.http import SUBMIT_TIMEOUT_S, session_from_dict

        body = {k: v for k, v in changes.items() if v is not None}
        return session_from_dict(self._session("PATCH", session_id, json=body,
                                               timeout=SUBMIT_TIMEOUT_S))

    # --- computes --------------------------------------------------------------------------

    def list_computes(self) -> list[dict[str, Any]]:
        return self.request("GET", "/api/computes")

    def create_compute(self, name: str, *, size: str | None,
                       idle_shutdown: str | None) -> dict[str, Any]:
        body = {"name": name, "size": size, "idle_shutdown": idle_shutdown}
        return self.request("POST", "/api/computes",
                            json={k: v for k, v in body.items() if v is not None},
                            timeout=max(self.timeout, LONG_S))

    def get_compute(self, name: str) -> dict[str, Any]:
        return self.request("GET", f"/api/computes/{_q(name)}")

    def start_compute(self, name: str) -> dict[str, Any]:
        return self.request("POST", f"/api/computes/{_q(name)}/start",
                            timeout=max(self.timeout, LONG_S))

    def stop_compute(self, name: str) -> dict[str, Any]:
        return self.request("POST", f"/api/computes/{_q(name)}/stop",
                            timeout=max(self.timeout, LONG_S))

    def delete_compute(self, name: str) -> dict[str, Any]:
        return self.request("DELETE", f"/api/computes/{_q(name)}",
                            timeout=max(self.timeout, LONG_S))

    def compute_sizes(self) -> dict[str, Any]:
        return self.request("GET", "/api/computes/sizes")

    # --- images ----------------------------------------------------------------------------

    def list_images(self) -> list[dict[str, Any]]:
        return self.request("GET", "/api/images")

    def get_image(self, ref: str) -> dict[str, Any]:
        return self.request("GET", f"/api/images/{quote(ref, safe='/:')}")

    def build_image(self, ref: str, *, on_progress: Progress = None) -> dict[str, Any]:
        op = self.request("POST", f"/api/images/{quote(ref, safe='/:')}/build")
        return self.wait_operation(op["id"], on_event=on_progress)

    def create_image(self, name: str, *, requirements: str | Path, base: str,
                     description: str, identity: str | None,
                     on_progress: Progress = None) -> dict[str, Any]:
        path = Path(requirements).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"{path}: cannot read the requirements file "
                               f"({type(exc).__name__})", hint="give a readable "
                               "requirements.txt", details={"file": str(path)}) from None
        body: dict[str, Any] = {"name": name, "base": base, "description": description}
        if identity and identity != USER_IDENTITY:
            body["identity"] = identity
        if getattr(self, "flows_by_path", False) and self.me_can("all:manage"):
            body["requirements_path"] = str(path.resolve())  # its local wheels, its -r files
        else:
            body["requirements"] = text
        op = self.request("POST", "/api/images", json=body)
        return self.wait_operation(op["id"], on_event=on_progress)

    def check_image(self, ref: str) -> dict[str, Any]:
        """Does ``ref`` have a newer version? (As ``ImageService.check``.)"""
        from flowsession.environments.images import parse_ref

        name, version = parse_ref(ref)
        current = self.get_image(ref)
        newest = current if version is None else self.get_image(name)
        return {"image": ref, "name": name, "pinned": version is not None,
                "current_version": current["version"], "newest_version": newest["version"],
                "newer_available": newest["version"] > current["version"]}

    # --- environments ----------------------------------------------------------------------

    def build_environment(self, flow: str | Path, *, refresh: bool = False,
                          identity: str | None = None,
                          on_progress: Progress = None) -> dict[str, Any]:
        name = self.flow_name(flow)
        body: dict[str, Any] = {"refresh": refresh}
        if identity and identity != USER_IDENTITY:
            body["identity"] = identity
        op = self.request("POST", f"/api/flows/{_q(name)}/environment/build", json=body)
        return self.wait_operation(op["id"], on_event=on_progress)

    def list_environments(self) -> list[dict[str, Any]]:
        return self.request("GET", "/api/environments")

    def get_environment(self, env_id: str) -> dict[str, Any]:
        return self.request("GET", f"/api/environments/{_q(env_id)}")

    def environment_packages(self, env_id: str) -> list[dict[str, Any]]:
        return self.request("GET", f"/api/environments/{_q(env_id)}/packages")

    def remove_environment(self, env_id: str) -> dict[str, Any]:
        return self.request("DELETE", f"/api/environments/{_q(env_id)}")

    # --- connections -----------------------------------------------------------------------

    def create_connection(self, file: str | Path, *, name: str | None) -> dict[str, Any]:
        from flowsession.access.connections import read_connection_file

        data = read_connection_file(file, name=name)  # ${env:VAR} read here, not there
        return self.request("POST", "/api/connections", json=data)

    def list_connections(self) -> list[dict[str, Any]]:
        return self.request("GET", "/api/connections")

    def get_connection(self, name: str) -> dict[str, Any]:
        return self.request("GET", f"/api/connections/{_q(name)}")

    def delete_connection(self, name: str) -> dict[str, Any]:
        return self.request("DELETE", f"/api/connections/{_q(name)}")

    # --- feed secrets and managed identities -----------------------------------------------

    def set_feed_secret(self, host: str, secret: str, *, identity: str | None) -> dict:
        if identity and identity != USER_IDENTITY:
            path = f"/api/identities/{_q(identity)}/feeds/{_q(host)}"
        else:
            path = f"/api/feeds/{_q(host)}"
        return self.request("PUT", path, json={"secret": secret})

    def list_feed_secrets(self, *, identity: str | None) -> list[dict[str, Any]]:
        """Your own feed secrets, or a managed identity's (masked)."""
        return self.request("GET", "/api/feeds",
                            params={"identity": identity} if identity else None)

    def delete_feed_secret(self, host: str, *, identity: str | None) -> dict[str, Any]:
        if identity and identity != USER_IDENTITY:
            return self.request("DELETE", f"/api/identities/{_q(identity)}/feeds/{_q(host)}")
        return self.request("DELETE", f"/api/feeds/{_q(host)}")

    def list_identities(self) -> list[dict[str, Any]]:
        return self.request("GET", "/api/identities")

    def get_identity(self, name: str) -> dict[str, Any]:
        return self.request("GET", f"/api/identities/{_q(name)}")

    def create_identity(self, name: str, *, description: str,
                        connections: Iterable[str]) -> dict[str, Any]:
        return self.request("POST", "/api/identities", json={
            "name": name, "description": description, "connections": list(connections)})

    def delete_identity(self, name: str) -> dict[str, Any]:
        return self.request("DELETE", f"/api/identities/{_q(name)}")

    def set_identity_connections(self, name: str, connections: Iterable[str]) -> dict:
        return self.request("PUT", f"/api/identities/{_q(name)}/connections",
                            json={"connections": list(connections)})

    # --- users, tokens, roles, the audit log -----------------------------------------------

    def me_can(self, scope: str) -> bool:
        from flowsession.access.accounts import allows

        return allows(self.me().get("scopes", []), scope)

    def list_users(self) -> list[dict[str, Any]]:
        return self.request("GET", "/api/users")

    def create_user(self, name: str, *, roles: Iterable[str],
                    display_name: str) -> dict[str, Any]:
        return self.request("POST", "/api/users", json={
            "name": name, "roles": list(roles), "display_name": display_name})

    def disable_user(self, name: str) -> dict[str, Any]:
        return self.request("POST", f"/api/users/{_q(name)}/disable")

    def list_tokens(self) -> list[dict[str, Any]]:
        return self.request("GET", "/api/tokens")

    def create_token(self, *, label: str) -> dict[str, Any]:
        return self.request("POST", "/api/tokens", json={"label": label})

    def revoke_token(self, token_id: str) -> dict[str, Any]:
        return self.request("DELETE", f"/api/tokens/{_q(token_id)}")

    def list_roles(self) -> list[dict[str, Any]]:
        return self.request("GET", "/api/roles")

    def create_role(self, name: str, scopes: Iterable[str], *,
                    description: str) -> dict[str, Any]:
        return self.request("POST", "/api/roles", json={
            "name": name, "scopes": list(scopes), "description": description})

    def delete_role(self, name: str) -> dict[str, Any]:
        return self.request("DELETE", f"/api/roles/{_q(name)}")

    def assign_role(self, user: str, role: str) -> dict[str, Any]:
        return self.request("POST", "/api/role-assignments", json={"user": user, "role": role})

    def unassign_role(self, user: str, role: str) -> dict[str, Any]:
        return self.request("DELETE", f"/api/role-assignments/{_q(user)}/{_q(role)}")

    def audit(self, *, limit: int, actor: str | None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        if actor:
            params["actor"] = actor
        return self.request("GET", "/api/audit", params=params)

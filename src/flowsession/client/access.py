"""The ``Client``'s connections, feed secrets and managed identities; who you are; users,
tokens, roles and the audit log."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flowsession.access import USER_IDENTITY
from flowsession.client.http import Http, q


class Access:
    """Mixed into ``Client``."""

    _http: Http

    # --- connections -----------------------------------------------------------------------

    def create_connection(self, file: str | Path, *, name: str | None = None
                          ) -> dict[str, Any]:
        """Create (or update yours of the same name) from prompt flow's connection YAML;
        ``${env:VAR}`` is read from this process's environment. The answer has ``created``."""
        from flowsession.access.connections import read_connection_file

        data = read_connection_file(file, name=name)  # ${env:VAR} read here, not there
        return self._http.request("POST", "/api/connections", json=data)

    def list_connections(self) -> list[dict[str, Any]]:
        return self._http.request("GET", "/api/connections")

    def get_connection(self, name: str) -> dict[str, Any]:
        return self._http.request("GET", f"/api/connections/{q(name)}")

    def delete_connection(self, name: str) -> dict[str, Any]:
        return self._http.request("DELETE", f"/api/connections/{q(name)}")

    # --- feed secrets and managed identities -----------------------------------------------

    def set_feed_secret(self, host: str, secret: str, *,
                        identity: str | None = None) -> dict[str, Any]:
        """The secret that fills ``{private}`` in feeds on ``host``: the ``user`` identity's
        (no ``identity``), or a managed identity's."""
        return self._http.request("PUT", _feed(host, identity), json={"secret": secret})

    def list_feed_secrets(self, *, identity: str | None = None) -> list[dict[str, Any]]:
        """``identity``, ``host``, ``secret`` (masked), ``created_at``: your own, or a managed
        identity's."""
        return self._http.request("GET", "/api/feeds",
                                  params={"identity": identity} if identity else None)

    def delete_feed_secret(self, host: str, *, identity: str | None = None) -> dict[str, Any]:
        return self._http.request("DELETE", _feed(host, identity))

    def list_identities(self) -> list[dict[str, Any]]:
        return self._http.request("GET", "/api/identities")

    def get_identity(self, name: str) -> dict[str, Any]:
        return self._http.request("GET", f"/api/identities/{q(name)}")

    def create_identity(self, name: str, *, description: str = "",
                        connections: Iterable[str] = ()) -> dict[str, Any]:
        return self._http.request("POST", "/api/identities", json={
            "name": name, "description": description, "connections": list(connections)})

    def delete_identity(self, name: str) -> dict[str, Any]:
        return self._http.request("DELETE", f"/api/identities/{q(name)}")

    def set_identity_connections(self, name: str, connections: Iterable[str]
                                 ) -> dict[str, Any]:
        return self._http.request("PUT", f"/api/identities/{q(name)}/connections",
                                  json={"connections": list(connections)})

    # --- who am I; users, tokens, roles, the audit log -------------------------------------

    def me(self) -> dict[str, Any]:
        """``user``, ``roles``, ``scopes``."""
        return self._http.me()

    def list_users(self) -> list[dict[str, Any]]:
        return self._http.request("GET", "/api/users")

    def create_user(self, name: str, *, roles: Iterable[str] = (),
                    display_name: str = "") -> dict[str, Any]:
        """A user with roles and a first ``token`` (in this answer only)."""
        return self._http.request("POST", "/api/users", json={
            "name": name, "roles": list(roles), "display_name": display_name})

    def disable_user(self, name: str) -> dict[str, Any]:
        return self._http.request("POST", f"/api/users/{q(name)}/disable")

    def list_tokens(self) -> list[dict[str, Any]]:
        """Your tokens (every user's with users:read); never their secrets."""
        return self._http.request("GET", "/api/tokens")

    def create_token(self, *, label: str = "") -> dict[str, Any]:
        """A new token for yourself: ``token`` (in this answer only), ``id``, ``label``."""
        return self._http.request("POST", "/api/tokens", json={"label": label})

    def revoke_token(self, token_id: str) -> dict[str, Any]:
        return self._http.request("DELETE", f"/api/tokens/{q(token_id)}")

    def list_roles(self) -> list[dict[str, Any]]:
        return self._http.request("GET", "/api/roles")

    def create_role(self, name: str, scopes: Iterable[str], *,
                    description: str = "") -> dict[str, Any]:
        return self._http.request("POST", "/api/roles", json={
            "name": name, "scopes": list(scopes), "description": description})

    def delete_role(self, name: str) -> dict[str, Any]:
        return self._http.request("DELETE", f"/api/roles/{q(name)}")

    def assign_role(self, user: str, role: str) -> dict[str, Any]:
        return self._http.request("POST", "/api/role-assignments",
                                  json={"user": user, "role": role})

    def unassign_role(self, user: str, role: str) -> dict[str, Any]:
        return self._http.request("DELETE", f"/api/role-assignments/{q(user)}/{q(role)}")

    def audit(self, *, limit: int = 200, actor: str | None = None) -> list[dict[str, Any]]:
        """Who did what to which resource, when, with what result: newest first."""
        params: dict[str, Any] = {"limit": limit}
        if actor:
            params["actor"] = actor
        return self._http.request("GET", "/api/audit", params=params)


def _feed(host: str, identity: str | None) -> str:
    """A feed secret's path: yours, or a managed identity's."""
    if identity and identity != USER_IDENTITY:
        return f"/api/identities/{q(identity)}/feeds/{q(host)}"
    return f"/api/feeds/{q(host)}"

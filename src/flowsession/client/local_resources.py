"""The in-process transport's methods for the other resources: computes, images,
environments, connections, feed secrets, managed identities, users, tokens, roles and the audit
log, called on the services directly, answering as the API does. (``LocalTransport`` in
``local.py`` holds flows, sessions and runs.) In-process there is no authentication: the user
is ``settings.user`` and may do everything."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flowsession.access.secrets import USER_IDENTITY, holder
from flowsession.config import format_duration, format_size, parse_duration

Progress = Callable[[dict[str, Any]], None] | None


def _compute(c) -> dict[str, Any]:
    d = c.to_dict()
    d["memory"] = format_size(c.memory_bytes)
    d["idle_shutdown"] = format_duration(c.idle_shutdown_s or 0)
    return d


class LocalResources:
    """Mixed into ``LocalTransport``: uses its ``settings``, ``user``, ``_sessions``,
    ``flow_arg``."""

    @property
    def _computes(self):
        return self._sessions.computes

    @property
    def _envs(self):
        return self._sessions.envs

    def _services(self, name: str, make: Callable[[], Any]) -> Any:
        cache = self.__dict__.setdefault("_more", {})
        if name not in cache:
            cache[name] = make()
        return cache[name]

    @property
    def _accounts(self):
        from flowsession.access.accounts import Accounts

        def make():
            accounts = Accounts(self._sessions.store)
            accounts.ensure_builtin_roles()
            return accounts

        return self._services("accounts", make)

    @property
    def _identities(self):
        from flowsession.access.identities import IdentityService

        return self._services("identities", lambda: IdentityService(self.settings,
                                                                     self._sessions.store))

    @property
    def _connections(self):
        from flowsession.access.connections import ConnectionService

        return self._services("connections", lambda: ConnectionService(self.settings,
                                                                       self._sessions.store))

    # --- computes --------------------------------------------------------------------------

    def list_computes(self) -> list[dict[str, Any]]:
        return [_compute(c) for c in self._computes.list(user=self.user)]

    def create_compute(self, name: str, *, size: str | None,
                       idle_shutdown: str | None) -> dict[str, Any]:
        idle = parse_duration(idle_shutdown, name="idle_shutdown") if idle_shutdown else None
        return _compute(asyncio.run(self._computes.create_instance(
            name, user=self.user, size=size, idle_shutdown_s=idle)))

    def get_compute(self, name: str) -> dict[str, Any]:
        c = self._computes.get(name, user=self.user)
        return {**_compute(c), "sessions": self._computes.session_count(c.id)}

    def start_compute(self, name: str) -> dict[str, Any]:
        return _compute(asyncio.run(self._computes.start(name, user=self.user)))

    def stop_compute(self, name: str) -> dict[str, Any]:
        c = self._computes.get(name, user=self.user)
        return _compute(asyncio.run(self._sessions.stop_compute(
            c, actor=self.user, reason=f"stopped by {self.user}")))

    def delete_compute(self, name: str) -> dict[str, Any]:
        c = self._computes.get(name, user=self.user)
        asyncio.run(self._computes.delete(c.id, user=self.user))
        return {"name": c.name, "deleted": True}

    def compute_sizes(self) -> dict[str, Any]:
        return {"sizes": [{"name": s.name, "vcpu": s.vcpu, "memory_bytes": s.memory_bytes,
                           "description": s.description}
                          for s in self._computes.catalog.values()],
                "vcpu_quota": self.settings.vcpu_quota,
                "vcpu_in_use": self._computes.vcpu_in_use()}

    # --- images ----------------------------------------------------------------------------

    def list_images(self) -> list[dict[str, Any]]:
        return [i.to_dict() for i in self._envs.images.list()]

    def get_image(self, ref: str) -> dict[str, Any]:
        images = self._envs.images
        image = images.get(ref)
        installed = images.layers(image).versions() if image.state == "READY" else {}
        return {**image.to_dict(), "installed": installed}

    def build_image(self, ref: str, *, on_progress: Progress = None) -> dict[str, Any]:
        return asyncio.run(self._envs.images.ensure_built(ref)).to_dict()

    def create_image(self, name: str, *, requirements: str | Path, base: str,
                     description: str, identity: str | None,
                     on_progress: Progress = None) -> dict[str, Any]:
        return asyncio.run(self._envs.create_image(
            name, base=base, requirements=Path(requirements).expanduser(),
            description=description, identity=identity or USER_IDENTITY)).to_dict()

    def check_image(self, ref: str) -> dict[str, Any]:
        return self._envs.images.check(ref)

    # --- environments ----------------------------------------------------------------------

    def build_environment(self, flow: str | Path, *, refresh: bool = False,
                          identity: str | None = None,
                          on_progress: Progress = None) -> dict[str, Any]:
        return asyncio.run(self._envs.ensure_for_flow(
            self.flow_arg(flow), identity=identity or USER_IDENTITY, refresh=refresh)).to_dict()

    def list_environments(self) -> list[dict[str, Any]]:
        return [e.to_dict() for e in self._envs.cache.list()]

    def get_environment(self, env_id: str) -> dict[str, Any]:
        cache = self._envs.cache
        return {**cache.get(env_id).to_dict(), "holders": cache.holders(env_id),
                "log": str(cache.log_path(env_id))}

    def environment_packages(self, env_id: str) -> list[dict[str, Any]]:
        return [dataclasses.asdict(p) for p in self._envs.packages(self._envs.cache.get(env_id))]

    def remove_environment(self, env_id: str) -> dict[str, Any]:
        self._envs.cache.remove(env_id)
        return {"id": env_id, "removed": True}

    # --- connections -----------------------------------------------------------------------

    def create_connection(self, file: str | Path, *, name: str | None) -> dict[str, Any]:
        conn, created = self._connections.create_from_file(file, owner=self.user, name=name)
        return {**conn.to_dict(), "created": created}

    def list_connections(self) -> list[dict[str, Any]]:
        return [c.to_dict() for c in self._connections.list(self.user)]

    def get_connection(self, name: str) -> dict[str, Any]:
        return self._connections.get(name, owner=self.user).to_dict()

    def delete_connection(self, name: str) -> dict[str, Any]:
        self._connections.delete(name, owner=self.user)
        return {"name": name, "deleted": True,
                "identities": self._identities.forget_connection(name)}

    # --- feed secrets and managed identities -----------------------------------------------

    def set_feed_secret(self, host: str, secret: str, *, identity: str | None) -> dict:
        identity = identity or USER_IDENTITY
        if identity == USER_IDENTITY:
            mine = holder(identity, self.user)
            self._identities.secrets.set(host, secret, identity=mine)
            hosts = self._identities.secrets.hosts(identity=mine).get(mine, [])
        else:
            hosts = list(self._identities.set_feed_secret(identity, host, secret).feed_hosts)
        return {"identity": identity, "host": host.strip().lower(), "stored": True,
                "feed_hosts": hosts}

    def list_feed_secrets(self, *, identity: str | None) -> list[dict[str, Any]]:
        if identity in (None, USER_IDENTITY):
            return [{**s, "identity": USER_IDENTITY} for s in self._identities.secrets.list(
                identity=holder(USER_IDENTITY, self.user))]
        return self._identities.secrets.list(identity=identity)

    def delete_feed_secret(self, host: str, *, identity: str | None) -> dict[str, Any]:
        self._identities.secrets.delete(host, identity=holder(identity, self.user))
        return {"identity": identity or USER_IDENTITY, "host": host.strip().lower(),
                "deleted": True}

    def _identity(self, identity) -> dict[str, Any]:
        return {**identity.to_dict(), "usable": True}

    def list_identities(self) -> list[dict[str, Any]]:
        return [self._identity(i) for i in self._identities.list()]

    def get_identity(self, name: str) -> dict[str, Any]:
        return self._identity(self._identities.get(name))

    def create_identity(self, name: str, *, description: str,
                        connections: Iterable[str]) -> dict[str, Any]:
        return self._identity(self._identities.create(name, by=self.user,
                                                      description=description,
                                                      connections=connections))

    def delete_identity(self, name: str) -> dict[str, Any]:
        self._identities.delete(name)
        return {"name": name, "deleted": True}

    def set_identity_connections(self, name: str, connections: Iterable[str]) -> dict:
        return self._identity(self._identities.set_connections(name, connections))

    # --- users, tokens, roles, the audit log (of this home's server) -----------------------

    def list_users(self) -> list[dict[str, Any]]:
        return self._accounts.list_users()

    def create_user(self, name: str, *, roles: Iterable[str],
                    display_name: str) -> dict[str, Any]:
        roles = list(roles)
        self._accounts.create_user(name, display_name=display_name)
        for role in roles:
            self._accounts.assign(name, role, by=self.user)
        token, info = self._accounts.issue_token(name, label="first")
        return {"name": name, "roles": roles, "token": token, "token_id": info.id}

    def disable_user(self, name: str) -> dict[str, Any]:
        self._accounts.set_disabled(name, True)
        return {"name": name, "disabled": True}

    def list_tokens(self) -> list[dict[str, Any]]:
        return [dataclasses.asdict(t) for t in self._accounts.tokens(None)]

    def create_token(self, *, label: str) -> dict[str, Any]:
        token, info = self._accounts.issue_token(self.user, label=label)
        return {"token": token, **dataclasses.asdict(info)}

    def revoke_token(self, token_id: str) -> dict[str, Any]:
        self._accounts.revoke(token_id)
        return {"id": token_id, "revoked": True}

    def list_roles(self) -> list[dict[str, Any]]:
        return self._accounts.list_roles()

    def create_role(self, name: str, scopes: Iterable[str], *,
                    description: str) -> dict[str, Any]:
        scopes = list(scopes)
        self._accounts.create_role(name, scopes, description=description)
        return {"name": name, "scopes": sorted(set(scopes))}

    def delete_role(self, name: str) -> dict[str, Any]:
        self._accounts.delete_role(name)
        return {"name": name, "deleted": True}

    def assign_role(self, user: str, role: str) -> dict[str, Any]:
        self._accounts.assign(user, role, by=self.user)
        return {"user": user, "role": role}

    def unassign_role(self, user: str, role: str) -> dict[str, Any]:
        self._accounts.unassign(user, role)
        return {"user": user, "role": role, "removed": True}

    def audit(self, *, limit: int, actor: str | None) -> list[dict[str, Any]]:
        """What this home's server recorded (in-process calls are not audited)."""
        from sqlalchemy import select

        from flowsession.store.tables import audit_log

        q = select(audit_log).order_by(audit_log.c.id.desc()).limit(limit)
        if actor:
            q = q.where(audit_log.c.actor == actor)
        with self._sessions.store.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

"""What every request handler needs: the services, the principal, the audit trail."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, Request
from sqlalchemy import insert, select

from flowsession.access.accounts import Accounts, Principal
from flowsession.access.connections import ConnectionService
from flowsession.access.identities import IdentityService
from flowsession.config import Settings
from flowsession.errors import Forbidden, NotFound, Unauthorized
from flowsession.runs.service import RunService
from flowsession.sessions.service import SessionService
from flowsession.store.tables import audit_log


@dataclass
class Services:
    settings: Settings
    sessions: SessionService
    runs: RunService
    connections: ConnectionService
    accounts: Accounts
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, settings: Settings) -> Services:
        sessions = SessionService.open(settings)
        runs = RunService.open(settings, sessions)
        return cls(settings=settings, sessions=sessions, runs=runs,
                   connections=runs.connections, accounts=Accounts(sessions.store))

    @property
    def store(self):
        return self.sessions.store

    @property
    def identities(self) -> IdentityService:
        if "identities" not in self.extra:
            self.extra["identities"] = IdentityService(self.settings, self.store)
        return self.extra["identities"]


def services(request: Request) -> Services:
    return request.app.state.services


def principal(request: Request, svc: Services = Depends(services)) -> Principal:
    """The caller, from ``Authorization: Bearer <token>``; 401 with no detail of why."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    who = svc.accounts.authenticate(token.strip()) if scheme.lower() == "bearer" else None
    if who is None:
        raise Unauthorized("authentication required",
                           hint="send Authorization: Bearer <token> with a valid token")
    request.state.principal = who
    return who


def require(scope: str):
    """A dependency: the caller must hold ``scope`` (403 otherwise)."""

    def check(who: Principal = Depends(principal)) -> Principal:
        if not who.can(scope):
            raise Forbidden(f"your roles ({', '.join(who.roles) or 'none'}) do not grant "
                            f"{scope}", hint="ask an Owner for a role with this scope",
                            details={"scope": scope})
        return who

    return check


def check_identity(svc: Services, who: Principal, identity: str | None) -> None:
    """May ``who`` act as ``identity`` (a session's or a build's)? 403 without
    ``identities:use:NAME``; then a managed identity that does not exist is 404. None or
    ``user`` (the caller's own) always may."""
    if not identity:
        return
    if not who.can_use_identity(identity):
        raise Forbidden(f"you may not use identity {identity!r}",
                        hint="ask an Owner for identities:use:" + identity,
                        details={"scope": f"identities:use:{identity}"})
    svc.identities.check_usable(identity)


def owner_for(who: Principal, owner: str, what: str) -> str:
    """The user to act as on a resource owned by ``owner``: yourself, or anyone if you manage
    everything. Another user's resource is NotFound, the same as a missing one."""
    if owner == who.user or who.manages_all:
        return owner
    raise NotFound(f"{what} does not exist")


def audit(svc: Services, *, actor: str, action: str, resource: str, status: int,
          result: str, detail: str = "") -> None:
    with svc.store.engine.begin() as conn:
        conn.execute(insert(audit_log).values(at=time.time(), actor=actor, action=action,
                                              resource=resource, status=status,
                                              result=result, detail=detail[:2000]))


def audit_entries(svc: Services, *, limit: int = 200, actor: str | None = None) -> list[dict]:
    q = select(audit_log).order_by(audit_log.c.id.desc()).limit(limit)
    if actor:
        q = q.where(audit_log.c.actor == actor)
    with svc.store.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(q)]


def dumps(obj: Any) -> str:
    return json.dumps(obj, default=str)

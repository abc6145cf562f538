"""Users, tokens, roles and role assignments, identities, and the audit log."""

from __future__ import annotations

import dataclasses

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field

from flowsession.access.accounts import Principal
from flowsession.api.context import (
    Forbidden,
    Services,
    audit_entries,
    principal,
    require,
    services,
)
from flowsession.errors import NotFound

router = APIRouter(tags=["access"])


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UserIn(Strict):
    name: str = Field(min_length=1, max_length=200)
    display_name: str = ""
    roles: list[str] = Field(default_factory=list)


class TokenIn(Strict):
    label: str = Field(default="", max_length=200)


class RoleIn(Strict):
    name: str = Field(min_length=1, max_length=200)
    scopes: list[str] = Field(min_length=1)
    description: str = ""


class AssignmentIn(Strict):
    user: str
    role: str


@router.get("/me")
def me(who: Principal = Depends(principal)) -> dict:
    return {"user": who.user, "roles": list(who.roles), "scopes": sorted(who.scopes)}


@router.get("/users")
def list_users(who: Principal = Depends(require("users:read")),
               svc: Services = Depends(services)) -> list[dict]:
    return svc.accounts.list_users()


@router.post("/users", status_code=201)
def create_user(body: UserIn, who: Principal = Depends(require("users:write")),
                svc: Services = Depends(services)) -> dict:
    """A user, with roles (assigning them needs roleAssignments:write too) and a first token,
    shown once."""
    if body.roles and not who.can("roleAssignments:write"):
        raise Forbidden("assigning roles needs roleAssignments:write",
                        details={"scope": "roleAssignments:write"})
    svc.accounts.create_user(body.name, display_name=body.display_name)
    for role in body.roles:
        svc.accounts.assign(body.name, role, by=who.user)
    token, info = svc.accounts.issue_token(body.name, label="first")
    return {"name": body.name, "roles": body.roles, "token": token, "token_id": info.id}


@router.post("/users/{name}/disable")
def disable_user(name: str, who: Principal = Depends(require("users:write")),
                 svc: Services = Depends(services)) -> dict:
    svc.accounts.set_disabled(name, True)
    return {"name": name, "disabled": True}


@router.get("/tokens")
def list_tokens(who: Principal = Depends(principal),
                svc: Services = Depends(services)) -> list[dict]:
    """Your tokens (every user's with users:read); never their secrets."""
    user = None if who.can("users:read") else who.user
    return [dataclasses.asdict(t) for t in svc.accounts.tokens(user)]


@router.post("/tokens", status_code=201)
def issue_token(body: TokenIn | None = None, who: Principal = Depends(principal),
                svc: Services = Depends(services)) -> dict:
    """A new token for yourself: the secret is in this answer only."""
    token, info = svc.accounts.issue_token(who.user, label=(body.label if body else ""))
    return {"token": token, **dataclasses.asdict(info)}


@router.delete("/tokens/{token_id}")
def revoke_token(token_id: str, who: Principal = Depends(principal),
                 svc: Services = Depends(services)) -> dict:
    token = svc.accounts.token(token_id)
    if token.user != who.user and not who.can("users:write"):
        raise NotFound(f"token {token_id!r} does not exist")
    svc.accounts.revoke(token_id)
    return {"id": token_id, "revoked": True}


@router.get("/roles")
def list_roles(who: Principal = Depends(principal),
               svc: Services = Depends(services)) -> list[dict]:
    return svc.accounts.list_roles()


@router.post("/roles", status_code=201)
def create_role(body: RoleIn, who: Principal = Depends(require("roles:write")),
                svc: Services = Depends(services)) -> dict:
    svc.accounts.create_role(body.name, body.scopes, description=body.description)
    return {"name": body.name, "scopes": sorted(set(body.scopes))}


@router.delete("/roles/{name}")
def delete_role(name: str, who: Principal = Depends(require("roles:write")),
                svc: Services = Depends(services)) -> dict:
    svc.accounts.delete_role(name)
    return {"name": name, "deleted": True}


@router.post("/role-assignments", status_code=201)
def assign(body: AssignmentIn, who: Principal = Depends(require("roleAssignments:write")),
           svc: Services = Depends(services)) -> dict:
    """Any role, Owner included (as Azure's User Access Administrator may)."""
    svc.accounts.assign(body.user, body.role, by=who.user)
    return {"user": body.user, "role": body.role}


@router.delete("/role-assignments/{user}/{role}")
def unassign(user: str, role: str, who: Principal = Depends(require("roleAssignments:write")),
             svc: Services = Depends(services)) -> dict:
    svc.accounts.unassign(user, role)
    return {"user": user, "role": role, "removed": True}


@router.get("/audit")
def audit(limit: int = Query(200, ge=1, le=10000), actor: str | None = None,
          who: Principal = Depends(require("audit:read")),
          svc: Services = Depends(services)) -> list[dict]:
    return audit_entries(svc, limit=limit, actor=actor)

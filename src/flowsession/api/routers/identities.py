"""Managed identities: named, workspace-level credentials a session can run as.

An identity holds package-feed secrets per host (they fill ``{private}`` feeds when the
session's environment, or a custom image, is built) and the names of connections it gives
access to (a run on a session of the identity gets them, whoever owns them). Using one needs
``identities:use:NAME``. Answers name the feed hosts, never a secret; a secret arrives in a
request body only, and is neither echoed nor logged.

``/api/feeds`` holds the feed secrets of the ``user`` identity: what a session or build run as
its user's own identity (not a managed one) uses. On a server these are the server's, shared by
every user's own-identity builds (the local server's user is its only user), so writing them
needs identities:write, as a managed identity's do.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field

from flowsession.access.accounts import Principal
from flowsession.access.identities import Identity
from flowsession.access.secrets import USER_IDENTITY, holder
from flowsession.api.context import Services, owner_for, require, services
from flowsession.errors import Conflict, Forbidden
from flowsession.sessions.records import ACTIVE_STATES

router = APIRouter(tags=["identities"])


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IdentityIn(Strict):
    name: str = Field(min_length=1, max_length=200)
    description: str = Field(default="", max_length=4000)
    connections: list[str] = Field(default_factory=list, description="connection names it "
                                   "gives access to (yours, or any with all:manage)")


class ConnectionsIn(Strict):
    connections: list[str]


class FeedSecretIn(Strict):
    secret: str = Field(min_length=1, max_length=8192, description="'user:token' or a token")


def _dict(who: Principal, identity: Identity) -> dict:
    return {**identity.to_dict(), "usable": who.can_use_identity(identity.name)}


def _check_connections(svc: Services, who: Principal, names: list[str]) -> None:
    """You may give access only to connections you could see yourself: yours, or any if you
    manage everything (someone else's is 404, as everywhere)."""
    for name in names:
        owner_for(who, svc.connections.find(name).owner, f"connection '{name}'")


@router.get("/identities")
def list_identities(who: Principal = Depends(require("identities:read")),
                    svc: Services = Depends(services)) -> list[dict]:
    """Every managed identity, its connections and feed hosts, and whether you may use it."""
    return [_dict(who, i) for i in svc.identities.list()]


@router.get("/identities/{name}")
def get_identity(name: str, who: Principal = Depends(require("identities:read")),
                 svc: Services = Depends(services)) -> dict:
    return _dict(who, svc.identities.get(name))


@router.post("/identities", status_code=201)
def create_identity(body: IdentityIn, who: Principal = Depends(require("identities:write")),
                    svc: Services = Depends(services)) -> dict:
    _check_connections(svc, who, body.connections)
    return _dict(who, svc.identities.create(body.name, by=who.user,
                                            description=body.description,
                                            connections=body.connections))


@router.delete("/identities/{name}")
def delete_identity(name: str, who: Principal = Depends(require("identities:write")),
                    svc: Services = Depends(services)) -> dict:
    """The identity and its feed secrets; refused (409) while a session runs as it."""
    svc.identities.get(name)
    using = [s.id for s in svc.sessions.records.list(owner=None, states=ACTIVE_STATES)
             if s.identity == name]
    if using:
        raise Conflict(f"identity {name!r} is used by {len(using)} active session(s)",
                       hint="stop them first", details={"sessions": using})
    svc.identities.delete(name)
    return {"name": name, "deleted": True}


@router.put("/identities/{name}/connections")
def set_connections(name: str, body: ConnectionsIn,
                    who: Principal = Depends(require("identities:write")),
                    svc: Services = Depends(services)) -> dict:
    """Replace the connections the identity gives access to."""
    svc.identities.get(name)
    _check_connections(svc, who, body.connections)
    return _dict(who, svc.identities.set_connections(name, body.connections))


@router.put("/identities/{name}/feeds/{host}")
def set_feed_secret(name: str, host: str, body: FeedSecretIn,
                    who: Principal = Depends(require("identities:write")),
                    svc: Services = Depends(services)) -> dict:
    """Store (or replace) the secret that fills ``{private}`` in feeds on ``host``."""
    identity = svc.identities.set_feed_secret(name, host, body.secret)
    return {"identity": name, "host": host.strip().lower(), "stored": True,
            "feed_hosts": list(identity.feed_hosts)}


@router.delete("/identities/{name}/feeds/{host}")
def delete_feed_secret(name: str, host: str,
                       who: Principal = Depends(require("identities:write")),
                       svc: Services = Depends(services)) -> dict:
    identity = svc.identities.delete_feed_secret(name, host)
    return {"identity": name, "host": host.strip().lower(), "deleted": True,
            "feed_hosts": list(identity.feed_hosts)}


# --- the ``user`` identity's feed secrets ----------------------------------------------------

@router.get("/feeds")
def list_feed_secrets(identity: str | None = Query(None, description="a managed identity "
                                                   "(needs identities:read); default: yours"),
                      who: Principal = Depends(require("environments:read")),
                      svc: Services = Depends(services)) -> list[dict]:
    """Feed secrets, masked (``user:****``): your own, or a managed identity's."""
    if identity and identity != USER_IDENTITY:
        if not who.can("identities:read"):
            raise Forbidden("reading a managed identity's feeds needs identities:read",
                            details={"scope": "identities:read"})
        svc.identities.get(identity)
        return svc.identities.secrets.list(identity=identity)
    mine = holder(USER_IDENTITY, who.user)
    return [{**s, "identity": USER_IDENTITY}
            for s in svc.identities.secrets.list(identity=mine)]


@router.put("/feeds/{host}")
def set_user_feed_secret(host: str, body: FeedSecretIn,
                         who: Principal = Depends(require("environments:write")),
                         svc: Services = Depends(services)) -> dict:
    """Store (or replace) your own secret for ``{private}`` feeds on ``host``: it fills your
    builds, never another user's."""
    secrets, mine = svc.identities.secrets, holder(USER_IDENTITY, who.user)
    secrets.set(host, body.secret, identity=mine)
    return {"identity": USER_IDENTITY, "host": host.strip().lower(), "stored": True,
            "feed_hosts": secrets.hosts(identity=mine).get(mine, [])}


@router.delete("/feeds/{host}")
def delete_user_feed_secret(host: str, who: Principal = Depends(require("environments:write")),
                            svc: Services = Depends(services)) -> dict:
    svc.identities.secrets.delete(host, identity=holder(USER_IDENTITY, who.user))
    return {"identity": USER_IDENTITY, "host": host.strip().lower(), "deleted": True}

"""prompt flow connections: created from their fields as JSON (prompt flow's connection YAML,
as JSON), listed and shown with every secret masked, deleted. A secret is never in an answer.

Connection names are unique on the server. Another user's connection is 404, the same as one
that does not exist, unless you manage everything.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from pydantic import BaseModel, ConfigDict, Field

from flowsession.access.accounts import Principal
from flowsession.access.connections import Connection
from flowsession.api.context import Services, owner_for, require, services

router = APIRouter(tags=["connections"])

Scalar = str | int | float | bool | None


class ConnectionIn(BaseModel):
    """The fields of prompt flow's connection YAML. Which apply depends on ``type``:
    open_ai (api_key, organization, base_url), azure_open_ai (api_key, api_base, api_type,
    api_version), custom (configs, secrets). An update may send a secret as '' or '******' to
    keep the stored one."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schema_: str | None = Field(default=None, alias="$schema")
    name: str = Field(min_length=1, max_length=200)
    type: str = Field(min_length=1, max_length=40)
    api_key: str | None = None
    organization: str | None = None
    base_url: str | None = None
    api_base: str | None = None
    api_type: str | None = None
    api_version: str | None = None
    configs: dict[str, Scalar] | None = None
    secrets: dict[str, str] | None = None


def connection_of(svc: Services, who: Principal, name: str) -> Connection:
    conn = svc.connections.find(name)
    owner_for(who, conn.owner, f"connection '{name}'")
    return conn


@router.post("/connections", status_code=201)
def create_connection(body: ConnectionIn, response: Response,
                      who: Principal = Depends(require("connections:write")),
                      svc: Services = Depends(services)) -> dict:
    """Create a connection, or update yours of the same name (200). ``${env:VAR}`` is refused:
    it would read the server's environment."""
    data = body.model_dump(by_alias=True, exclude_none=True)
    conn, created = svc.connections.create(data, owner=who.user, source="the connection",
                                           allow_env=False)
    if not created:
        response.status_code = 200
    return {**conn.to_dict(), "created": created}


@router.get("/connections")
def list_connections(who: Principal = Depends(require("connections:read")),
                     svc: Services = Depends(services)) -> list[dict]:
    """Yours (everyone's if you manage everything); secrets masked."""
    owner = None if who.manages_all else who.user
    return [c.to_dict() for c in svc.connections.list(owner)]


@router.get("/connections/{name}")
def get_connection(name: str, who: Principal = Depends(require("connections:read")),
                   svc: Services = Depends(services)) -> dict:
    return connection_of(svc, who, name).to_dict()


@router.delete("/connections/{name}")
def delete_connection(name: str, who: Principal = Depends(require("connections:write")),
                      svc: Services = Depends(services)) -> dict:
    """Delete it; it also leaves every managed identity that gave access to it (a later
    connection of the same name is not given away)."""
    conn = connection_of(svc, who, name)
    svc.connections.delete(name, owner=conn.owner)
    identities = svc.identities.forget_connection(name)
    return {"name": name, "deleted": True, "identities": identities}

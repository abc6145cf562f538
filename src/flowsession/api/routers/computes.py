"""Computes: serverless ones come and go with their sessions; instances belong to one user.
Another user's compute is 404, the same as one that does not exist; an Owner
(``all:manage``) sees and stops every compute (by id)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from flowsession.access.accounts import Principal
from flowsession.api.context import Services, require, services
from flowsession.computes.service import Compute
from flowsession.config import format_duration, format_size, parse_duration
from flowsession.errors import NotFound

router = APIRouter(tags=["computes"])


class InstanceIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100)
    size: str | None = None
    idle_shutdown: str | None = Field(default=None, description="e.g. 2h (stops, never deletes)")


def _dict(c: Compute) -> dict:
    d = c.to_dict()
    d["memory"] = format_size(c.memory_bytes)
    d["idle_shutdown"] = format_duration(c.idle_shutdown_s or 0)
    return d


def compute_of(svc: Services, who: Principal, name_or_id: str) -> Compute:
    try:
        return svc.sessions.computes.get(name_or_id, user=who.user)
    except NotFound as exc:
        if not who.manages_all:
            raise
        missing = exc
    found = [c for c in svc.sessions.computes.list(user=None)
             if name_or_id in (c.id, c.name)]
    if not found:
        raise missing  # as for anyone: the service's message and hint
    if len(found) != 1:
        raise NotFound(f"compute '{name_or_id}' does not exist (several users have one by "
                       "that name: use its id)", hint="list them: GET /api/computes")
    return found[0]


@router.get("/computes/sizes")
def sizes(who: Principal = Depends(require("computes:read")),
          svc: Services = Depends(services)) -> dict:
    computes = svc.sessions.computes
    return {"sizes": [{"name": s.name, "vcpu": s.vcpu, "memory_bytes": s.memory_bytes,
                       "description": s.description} for s in computes.catalog.values()],
            "vcpu_quota": computes.quota, "vcpu_quota_source": computes.quota_source,
            "vcpu_in_use": computes.vcpu_in_use(), "implicit_size": computes.smallest_size().name}


@router.get("/computes")
def list_computes(who: Principal = Depends(require("computes:read")),
                  svc: Services = Depends(services)) -> list[dict]:
    owner = None if who.manages_all else who.user
    counts = svc.sessions.computes.session_counts()  # as GET /computes/{name} counts them
    return [{**_dict(c), "sessions": counts.get(c.id, 0)}
            for c in svc.sessions.computes.list(user=owner)]


@router.post("/computes", status_code=201)
async def create_instance(body: InstanceIn, who: Principal = Depends(require("computes:write")),
                          svc: Services = Depends(services)) -> dict:
    compute = await svc.sessions.computes.create_instance(
        body.name, user=who.user, size=body.size,
        idle_shutdown_s=parse_duration(body.idle_shutdown, name="idle_shutdown")
        if body.idle_shutdown else None)
    return _dict(compute)


@router.get("/computes/{name}")
def get_compute(name: str, who: Principal = Depends(require("computes:read")),
                svc: Services = Depends(services)) -> dict:
    c = compute_of(svc, who, name)
    return {**_dict(c), "sessions": svc.sessions.computes.session_count(c.id)}


@router.post("/computes/{name}/start")
async def start(name: str, who: Principal = Depends(require("computes:write")),
                svc: Services = Depends(services)) -> dict:
    c = compute_of(svc, who, name)
    return _dict(await svc.sessions.computes.start(c.id, user=c.owner))


@router.post("/computes/{name}/stop")
async def stop(name: str, who: Principal = Depends(require("computes:write")),
               svc: Services = Depends(services)) -> dict:
    c = compute_of(svc, who, name)
    return _dict(await svc.sessions.stop_compute(c, actor=who.user,
                                                 reason=f"stopped by {who.user}"))


@router.delete("/computes/{name}")
async def delete(name: str, who: Principal = Depends(require("computes:write")),
                 svc: Services = Depends(services)) -> dict:
    c = compute_of(svc, who, name)
    await svc.sessions.computes.delete(c.id, user=c.owner)
    return {"name": c.name, "deleted": True}

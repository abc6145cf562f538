"""Environments: an image plus a flow's resolved requirements, built once, content-addressed
and shared by every session that needs the same. By id (anyone with environments:read), or
as a registered flow's environment (that flow's owner only: another's flow is 404).

Which sessions hold an environment is shown only to those who manage everything; others see
the count (``refs``). Removing one that a session holds is refused (409).
"""

from __future__ import annotations

import dataclasses

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from flowsession.access.accounts import Principal
from flowsession.access.secrets import holder
from flowsession.api.context import Services, check_identity, require, services
from flowsession.api.routers.flows import flow_of
from flowsession.environments.cache import Environment
from flowsession.environments.service import EnvironmentService, Prepared
from flowsession.environments.state import BuildState
from flowsession.errors import Conflict

router = APIRouter(tags=["environments"])


class BuildIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    refresh: bool = Field(default=False, description="resolve the requirements again "
                          "(newer versions)")
    identity: str | None = Field(default=None, description="whose feed secrets fill "
                                 "{private} (needs identities:use:NAME); the default is yours")


def envs(svc: Services) -> EnvironmentService:
    return svc.sessions.envs


def _dict(svc: Services, who: Principal, env: Environment) -> dict:
    d = env.to_dict()
    if who.manages_all:  # which sessions hold it, and where it and its log are on the server
        d["holders"] = envs(svc).cache.holders(env.id)
        d["log"] = str(envs(svc).cache.log_path(env.id))
    else:
        d.pop("path", None)
    return d


@router.get("/environments")
def list_environments(who: Principal = Depends(require("environments:read")),
                      svc: Services = Depends(services)) -> list[dict]:
    """Most recently used first."""
    return [_dict(svc, who, e) for e in envs(svc).cache.list()]


@router.get("/environments/{env_id}")
def get_environment(env_id: str, who: Principal = Depends(require("environments:read")),
                    svc: Services = Depends(services)) -> dict:
    return _dict(svc, who, envs(svc).cache.get(env_id))


@router.get("/environments/{env_id}/packages")
def environment_packages(env_id: str, who: Principal = Depends(require("environments:read")),
                         svc: Services = Depends(services)) -> list[dict]:
    """name, version and origin (image | requirements) of each package."""
    service = envs(svc)
    return [dataclasses.asdict(p) for p in service.packages(service.cache.get(env_id))]


@router.delete("/environments/{env_id}")
def remove_environment(env_id: str, who: Principal = Depends(require("environments:write")),
                       svc: Services = Depends(services)) -> dict:
    """Delete an environment no session uses (409 while one does)."""
    envs(svc).cache.remove(env_id)
    return {"id": env_id, "removed": True}


# --- a registered flow's environment ---------------------------------------------------------

async def _prepared(svc: Services, who: Principal, name: str, identity: str | None
                    ) -> Prepared:
    flow, owner = flow_of(svc, who, name)
    check_identity(svc, who, identity)
    return await envs(svc).prepare(flow.path, identity=holder(identity, owner))


@router.get("/flows/{name}/environment")
async def flow_environment(name: str, identity: str | None = Query(None),
                           who: Principal = Depends(require("environments:read")),
                           svc: Services = Depends(services)) -> dict:
    """The environment the flow's files need now: its id, image and requirements, and the
    environment itself if it is built (``environment`` is null otherwise)."""
    prepared = await _prepared(svc, who, name, identity)
    env = envs(svc).cache.find(prepared.env_id)
    return {"flow": name, "env_id": prepared.env_id, "image": prepared.image.ref,
            "requirements": list(prepared.requirements.requirements),
            "built": env is not None and env.state == BuildState.READY,
            "environment": _dict(svc, who, env) if env is not None else None}


@router.get("/flows/{name}/environment/packages")
async def flow_packages(name: str, identity: str | None = Query(None),
                        who: Principal = Depends(require("environments:read")),
                        svc: Services = Depends(services)) -> list[dict]:
    """The packages of the flow's environment (409 until it is built)."""
    prepared = await _prepared(svc, who, name, identity)
    service = envs(svc)
    env = service.cache.find(prepared.env_id)
    if env is None or env.state != BuildState.READY:
        raise Conflict(f"the environment of flow {name!r} is not built "
                       f"({env.state if env else 'never built'})",
                       hint=f"build it: POST /api/flows/{name}/environment/build",
                       details={"env_id": prepared.env_id})
    return [dataclasses.asdict(p) for p in service.packages(env)]


@router.post("/flows/{name}/environment/build", status_code=202)
async def build_flow_environment(name: str, request: Request, body: BuildIn | None = None,
                                 who: Principal = Depends(require("environments:write")),
                                 svc: Services = Depends(services)) -> dict:
    """Build (or find) the flow's environment: an operation that ends with it."""
    body = body or BuildIn()
    flow, owner = flow_of(svc, who, name)
    check_identity(svc, who, body.identity)
    identity = holder(body.identity, owner)

    async def work(emit) -> dict:
        emit({"event": "progress", "message": f"preparing the environment of {name}"})
        env = await envs(svc).ensure_for_flow(flow.path, identity=identity,
                                              refresh=body.refresh)
        return _dict(svc, who, env)

    return request.app.state.operations.start("environment.build", name, who.user, work)

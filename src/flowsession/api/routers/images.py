"""Images: named, versioned base environments, shared by everyone on the server.

A reference is ``name`` (the newest version) or ``name:version``; names may hold '/'
(``flowsession/runtime``), so the reference is the rest of the path, and ``?version=`` may
give the version instead. Building and creating take long: they answer with an operation.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from flowsession.access.accounts import Principal
from flowsession.access.secrets import holder
from flowsession.api.context import Services, check_identity, require, services
from flowsession.environments.images import DEFAULT_IMAGE, Image, parse_ref
from flowsession.environments.requirements import parse_requirements
from flowsession.environments.service import EnvironmentService
from flowsession.environments.state import BuildState
from flowsession.errors import Forbidden, InvalidInput

router = APIRouter(tags=["images"])
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)(?!\{private\}@)[^/@\s]+@")


class ImageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, description="the new image's name; "
                      "versions are numbered for you")
    base: str = Field(default=DEFAULT_IMAGE, min_length=1, max_length=220,
                      description="the image to extend (name or name:version)")
    requirements: str | None = Field(default=None, min_length=1, max_length=1024 * 1024,
                                     description="the packages to add, as a requirements.txt's "
                                     "text")
    requirements_path: str | None = Field(default=None, max_length=4096, description="instead "
                                          "of the text: a requirements file on the server's "
                                          "machine, with its local wheels and -r files (needs "
                                          "all:manage)")
    description: str = Field(default="", max_length=4000)
    identity: str | None = Field(default=None, description="whose feed secrets fill "
                                 "{private} (needs identities:use:NAME); the default is yours")


def envs(svc: Services) -> EnvironmentService:
    return svc.sessions.envs


def _ref(ref: str, version: int | None) -> str:
    if version is None:
        return ref
    name, given = parse_ref(ref)
    if given is not None and given != version:
        raise InvalidInput(f"image '{ref}' names version {given} but ?version= says {version}",
                           hint="give the version once", details={"field": "version"})
    return f"{name}:{version}"


def _dict(image: Image) -> dict:
    """What everyone with images:read may see: a URL's user:password (written into the
    requirements by hand) is masked; ``{private}`` is only a placeholder."""
    d = image.to_dict()
    d["requirements"] = _USERINFO.sub(r"\1****@", d["requirements"] or "")
    return d


@router.get("/images")
def list_images(who: Principal = Depends(require("images:read")),
                svc: Services = Depends(services)) -> list[dict]:
    return [_dict(i) for i in envs(svc).images.list()]


@router.get("/images/{ref:path}")
def get_image(ref: str, version: int | None = Query(None, ge=1, le=2**31 - 1),
              who: Principal = Depends(require("images:read")),
              svc: Services = Depends(services)) -> dict:
    """An image and (once built) the packages it holds."""
    images = envs(svc).images
    image = images.get(_ref(ref, version))
    installed = images.layers(image).versions() if image.state == BuildState.READY else {}
    return {**_dict(image), "installed": installed}


@router.post("/images/{ref:path}/build", status_code=202)
async def build_image(ref: str, request: Request, version: int | None = Query(None, ge=1, le=2**31 - 1),
                      who: Principal = Depends(require("images:write")),
                      svc: Services = Depends(services)) -> dict:
    """Build an image now (images are otherwise built on first use): an operation."""
    images = envs(svc).images
    image = images.get(_ref(ref, version))  # an unknown image: 404 now, not in the operation

    async def work(emit) -> dict:
        emit({"event": "progress", "message": f"building image {image.ref}"})
        return _dict(await images.ensure_built(image.ref, on_line=_lines(emit)))

    return request.app.state.operations.start("image.build", image.ref, who.user, work)


@router.post("/images", status_code=202)
async def create_image(body: ImageIn, request: Request,
                       who: Principal = Depends(require("images:write")),
                       svc: Services = Depends(services)) -> dict:
    """A custom image: ``base`` plus the packages of ``requirements``. Without all:manage the
    requirements name index packages only (no local files, no -r/-c). An operation."""
    check_identity(svc, who, body.identity)
    name, given = parse_ref(body.name)
    if given is not None:
        raise InvalidInput(f"image name '{body.name}' has a version",
                           hint="versions are numbered for you: give the name only",
                           details={"field": "name"})
    if (body.requirements is None) == (body.requirements_path is None):
        raise InvalidInput("give the requirements' text or (on the server's machine) their "
                           "path, not both", hint="send 'requirements'",
                           details={"field": "requirements"})
    if body.requirements_path is not None and not who.manages_all:
        raise Forbidden("a requirements file of the server's machine needs all:manage",
                        hint="send the requirements' text instead",
                        details={"scope": "all:manage"})
    service = envs(svc)
    service.images.get(body.base)  # an unknown base: 404 now
    folder = Path(tempfile.mkdtemp(prefix="image-", dir=_scratch(svc)))
    requirements = folder / "requirements.txt"
    if body.requirements_path is not None:
        requirements = Path(body.requirements_path)
        if not requirements.is_file():
            shutil.rmtree(folder, ignore_errors=True)
            raise InvalidInput(f"{requirements}: the file does not exist",
                               hint="give a requirements file", details={"field":
                                                                        "requirements_path"})
    else:
        requirements.write_text(body.requirements)
    identity = holder(body.identity, who.user)
    confined = not who.manages_all
    try:  # a refused line is refused now (422), before any operation
        if confined:
            parse_requirements(requirements, display="requirements", allow_local=False,
                               allow_includes=False)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise

    async def work(emit) -> dict:
        emit({"event": "progress", "message": f"creating {name} from {body.base}"})
        try:
            return _dict(await service.create_image(
                name, base=body.base, requirements=requirements, description=body.description,
                identity=identity, confined=confined, on_line=_lines(emit)))
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    return request.app.state.operations.start("image.create", name, who.user, work)


def _lines(emit, limit: int = 2000):
    """A build's lines (its steps and packages) as progress events, as they come; bounded."""
    sent = [0]

    def line(text: str) -> None:
        sent[0] += 1
        if sent[0] <= limit:
            emit({"event": "progress", "message": text[:500]})

    return line


def _scratch(svc: Services) -> Path:
    path = svc.settings.home / "tmp"
    path.mkdir(parents=True, exist_ok=True)
    return path

"""Images: named, versioned base environments. The only writer of the ``images`` table.

``flowsession/runtime:<version>`` ships with the product as a lock file (``builtin_images/``) and is
built on first use. A custom image is another image plus packages, layered over it.
References: ``name`` (the newest version) or ``name:version``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError

from flowsession.backends.compute.base import ImageDef
from flowsession.backends.uv import EnvSpec, ImageLayers, UvEnvBuilder, parse_pins, tree_size
from flowsession.config import Settings
from flowsession.environments import DEFAULT_IMAGE, fsops
from flowsession.environments.buildlog import BuildLog
from flowsession.environments.requirements import FlowRequirements, parse_requirements
from flowsession.environments.state import BuildState
from flowsession.errors import (
    BuildFailed,
    ContainerImageUnsupported,
    ImageExists,
    ImageNotFound,
    InvalidInput,
)
from flowsession.store import Store
from flowsession.store.tables import images

_BUILTIN_DIR = "builtin_images"
_BUILTIN = {DEFAULT_IMAGE: "runtime"}  # image name -> folder of lock files ("<version>.lock")
_MARKER = ".flowsession-image.json"  # written last into a build: its presence means complete
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*(/[a-z0-9][a-z0-9._-]*)*$")


@dataclass(frozen=True)
class Image:
    name: str
    version: int
    state: BuildState
    parent: str | None
    builtin: bool
    description: str
    requirements: str
    layer_lock: str
    python: str | None
    python_version: str | None
    platform: str | None
    path: str | None
    size_bytes: int | None
    error: str | None
    created_at: float
    built_at: float | None

    def __post_init__(self) -> None:  # a row holds the value
        object.__setattr__(self, "state", BuildState(self.state))

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["ref"] = self.ref
        d["packages"] = len(parse_pins(self.layer_lock))
        return d


# prompt flow's own runtime images (Azure's compute session and `pf` use them); any tag or
# digest, with or without the registry; prompt flow's own test flows name the older registry
# (promptflow.azurecr.io/promptflow-runtime)
_PF_RUNTIME = re.compile(
    r"^(?:(?:mcr\.microsoft\.com/)?azureml/promptflow/|promptflow\.azurecr\.io/)"
    r"promptflow-(?:runtime(?:-stable)?|python|runtime-base)(?::[\w][\w.-]*)?"
    r"(?:@sha256:[0-9a-f]{64})?$", re.IGNORECASE)


def is_promptflow_runtime(ref: str) -> bool:
    """Is ``ref`` one of prompt flow's published runtime images (any tag)?"""
    return bool(_PF_RUNTIME.match(ref.strip()))


def flow_image(ref: str | None) -> tuple[str, str | None]:
    """The image a flow's ``environment.image`` runs on here, and a note when it is not the
    one named: prompt flow's runtime image runs on the default image (which provides
    promptflow)."""
    if not ref:
        return DEFAULT_IMAGE, None
    if is_promptflow_runtime(ref):
        return DEFAULT_IMAGE, (f"environment.image {ref.strip()} is prompt flow's runtime "
                               f"image: the session runs on {DEFAULT_IMAGE}, which provides "
                               "promptflow")
    return ref, None


_CONTAINER_HINT = (
    "remove environment.image (the default image provides promptflow), use an image that "
    "exists here (flowsession image list), or make one from the image's Dockerfile: "
    "flowsession image create NAME --from-dockerfile Dockerfile (FROM a prompt flow runtime "
    "image, COPY requirements.txt, RUN pip install ...), or --from flowsession/runtime -r "
    "requirements.txt")


def parse_ref(ref: str) -> tuple[str, int | None]:
    """'name' or 'name:version' -> (name, version or None). Container references are refused."""
    ref = ref.strip()
    first = ref.split("/", 1)[0]
    if "/" in ref and ("." in first or ":" in first or first == "localhost") or "@sha256:" in ref:
        raise ContainerImageUnsupported(
            f"'{ref}' is a container image; container images need a container-capable "
            "compute backend, and this one runs images built with uv",
            hint=_CONTAINER_HINT,
        )
    name, _, version = ref.partition(":")
    if not _NAME.match(name):
        raise InvalidInput(
            f"'{ref}' is not a valid image name",
            hint="use lowercase letters, digits, '.', '_', '-' and '/', e.g. team/rag:2",
        )
    if version and not version.isdigit():  # a container tag (python:3.11, x:latest)
        raise ContainerImageUnsupported(
            f"image '{ref}': an image's version here is a number, like {name}:1; a tag like "
            f"'{version}' names a container image, and this backend runs images built with uv",
            hint=_CONTAINER_HINT)
    return name, int(version) if version else None


class ImageService:
    def __init__(self, settings: Settings, store: Store, builder: UvEnvBuilder):
        self.settings, self.store, self.builder = settings, store, builder
        self._register_builtins()

    # --- reading -------------------------------------------------------------------------

    def list(self) -> list[Image]:
        with self.store.engine.connect() as c:
            rows = c.execute(select(images).order_by(images.c.name, images.c.version)).all()
        return [Image(**r._mapping) for r in rows]

    def get(self, ref: str) -> Image:
        name, version = parse_ref(ref)
        q = select(images).where(images.c.name == name)
        q = q.where(images.c.version == version) if version else q.order_by(images.c.version.desc())
        with self.store.engine.connect() as c:
            row = c.execute(q.limit(1)).first()
        if row is None:
            known = ", ".join(sorted({i.ref for i in self.list()})) or "none"
            raise ImageNotFound(
                f"image '{ref}' does not exist (images here: {known})",
                hint="pick one of those, or create one: "
                "flowsession image create NAME --from flowsession/runtime -r FILE",
            )
        return Image(**row._mapping)

    def check(self, ref: str) -> dict:
        """Does ``ref`` have a newer version? (``image check FLOW`` and the session page.)"""
        name, version = parse_ref(ref)
        newest = self.get(name)  # a bare name is the newest version
        current = self.get(ref)
        return {
            "image": ref,
            "name": name,
            "pinned": version is not None,
            "current_version": current.version,
            "newest_version": newest.version,
            "newer_available": newest.version > current.version,
        }

    def layers(self, image: Image) -> ImageLayers:
        """The image as an environment sees it: every layer's site-packages and all the pins."""
        chain: list[Image] = []
        node: Image | None = image
        while node is not None:
            if node.state != BuildState.READY:
                raise BuildFailed(f"image {node.ref} is not built (state {node.state})",
                                  hint=f"build it: flowsession image build {node.ref}")
            chain.append(node)
            node = self.get(node.parent) if node.parent else None
        major_minor = ".".join((image.python_version or "").split(".")[:2])
        site = [str(Path(n.path) / "lib" / f"python{major_minor}" / "site-packages") for n in chain]
        return ImageLayers(
            ref=image.ref,
            python=image.python or "",
            python_version=image.python_version or "",
            platform=image.platform or "",
            site_dirs=tuple(site),
            pins="".join(n.layer_lock for n in reversed(chain)),
        )

    # --- building --------------------------------------------------------------------------

    async def ensure_built(self, ref: str, *, requirements: FlowRequirements | None = None,
                           credentials: Mapping[str, str] | None = None,
                           on_line: Callable[[str], None] | None = None) -> Image:
        """Build ``ref`` if it is not built yet (one build per image at a time).

        ``requirements`` carries a custom image's feeds; a rebuild without them (after a
        failed or killed build) installs its pinned layer from the default index."""
        image = self.get(ref)
        if image.state == BuildState.READY and image.path and Path(image.path).exists():
            return image
        final = self._path(image)
        lock = self.settings.images_dir / ".locks" / f"{final.parent.name}-{image.version}.lock"
        async with fsops.exclusive(lock):
            image = self.get(image.ref)
            if image.state == BuildState.READY and image.path and Path(image.path).exists():
                return image
            fsops.clear_stale(final)
            if self._adopt(image, final):
                return self.get(image.ref)
            self._set(image, state=BuildState.BUILDING, error=None)
            tmp = fsops.temp_dir_for(final)
            log_path = self.settings.logs_dir / "images" / f"{final.parent.name}-{image.version}.log"
            try:
                with BuildLog(log_path, secrets=(credentials or {}).values(),
                              on_line=on_line) as log:
                    log.step(f"building image {image.ref}")
                    await self._build_into(image, tmp, log, requirements, credentials)
                    info = await self.builder.inspect(tmp)
                    record = dict(
                        python=info.base_python, python_version=info.version,
                        platform=info.platform, size_bytes=tree_size(tmp),
                        # a custom image's layer is resolved at create; a builtin's is its venv
                        layer_lock=image.layer_lock or await self.builder.freeze(tmp))
                    # written last: a build with this file is complete, whoever recorded it
                    (tmp / _MARKER).write_text(json.dumps(
                        {"ref": image.ref, "digest": self._digest(image), "record": record}))
                    fsops.install(tmp, final)
                    log.step(f"image {image.ref} ready at {final}")
            except BaseException as exc:
                fsops.discard(tmp)
                self._set(image, state=BuildState.FAILED, error=str(exc)[:4000])
                raise
            self._set(image, state=BuildState.READY, path=str(final), built_at=time.time(),
                      error=None, **record)
            return self.get(image.ref)

    async def create(self, name: str, *, base: str, requirements: Path, description: str = "",
                     credentials: Mapping[str, str] | None = None,
                     on_line: Callable[[str], None] | None = None) -> Image:
        """A custom image: ``base`` plus the packages of ``requirements`` (local wheels allowed).
        ``credentials`` (host -> secret) fill ``{private}`` feeds in the requirements."""
        parsed_name, version = parse_ref(name)
        if version is not None:
            raise InvalidInput(f"image create takes a name without a version, got '{name}'",
                               hint="versions are numbered for you: 1, 2, ...")
        if parsed_name in _BUILTIN:
            raise InvalidInput(f"'{parsed_name}' is the name of a built-in image",
                               hint="choose another name, e.g. myteam/runtime")
        if not requirements.is_file():
            raise InvalidInput(f"requirements file {requirements} does not exist",
                               hint="pass the file that lists the image's extra packages with -r")
        parent = await self.ensure_built(base)
        layers = self.layers(parent)
        reqs = parse_requirements(requirements.resolve(), display=str(requirements),
                                  allow_local=True, image_versions=layers.versions())
        log_path = self.settings.logs_dir / "images" / f"create-{_slug(parsed_name)}.log"
        with BuildLog(log_path, secrets=(credentials or {}).values(), on_line=on_line) as log:
            lock = await self.builder.resolve(layers, reqs, log, credentials=credentials)
        new_version = self._insert_next_version(
            parsed_name, parent=parent.ref, description=description,
            requirements=requirements.read_text(), layer_lock=lock)
        return await self.ensure_built(f"{parsed_name}:{new_version}", requirements=reqs,
                                       credentials=credentials, on_line=on_line)

    def define(self, image: ImageDef) -> None:
        """Record an image defined elsewhere (by the control plane, for a cluster node that
        builds it here): a built-in one must ship with this installation; a custom one gets
        its row (DEFINED until built), or its row is brought up to date if its content
        differs (then it is rebuilt at first use)."""
        try:
            have = self.get(image.ref)
        except ImageNotFound:
            have = None
        if image.builtin:
            if have is None or not have.builtin:
                raise ImageNotFound(f"built-in image {image.ref} is not known to the "
                                    "flowsession installed here",
                                    hint="install the control plane's flowsession version "
                                         "on every node")
            return
        values = dict(parent=image.parent, layer_lock=image.layer_lock,
                      requirements=image.requirements, description=image.description)
        if have is None:
            with contextlib.suppress(IntegrityError), self.store.engine.begin() as c:
                c.execute(insert(images).values(name=image.name, version=image.version,
                                                builtin=False, state=BuildState.DEFINED,
                                                created_at=time.time(), **values))
        elif (have.parent, have.layer_lock) != (image.parent, image.layer_lock):
            self._set(have, state=BuildState.DEFINED, path=None, error=None, **values)

    def _insert_next_version(self, name: str, **values) -> int:
        """Record the next version of ``name``; concurrent creators get successive numbers."""
        for _attempt in range(5):
            try:
                with self.store.engine.begin() as c:
                    latest = c.execute(select(func.max(images.c.version))
                                       .where(images.c.name == name)).scalar()
                    c.execute(insert(images).values(
                        name=name, version=(latest or 0) + 1, builtin=False,
                        state=BuildState.DEFINED, created_at=time.time(), **values))
                    return (latest or 0) + 1
            except IntegrityError:
                continue  # another creator took that number: take the next one
        raise ImageExists(f"could not number a new version of image '{name}'",
                          hint="another create of the same image is running; try again")

    async def _build_into(self, image: Image, tmp: Path, log: BuildLog,
                          requirements: FlowRequirements | None,
                          credentials: Mapping[str, str] | None) -> None:
        if image.builtin:
            await self.builder.build_base(self._builtin_lock(image), self.settings.python, tmp, log)
            return
        parent = self.layers(self.get(image.parent or ""))
        log.step(f"layer over {parent.ref}: {len(parse_pins(image.layer_lock))} packages")
        await self.builder.build(EnvSpec(parent, image.layer_lock, requirements), tmp, log,
                                 credentials=credentials)

    # --- helpers ---------------------------------------------------------------------------

    def _digest(self, image: Image) -> str:
        """What the image's content follows from: its lock (builtin) or parent + layer."""
        source = (self._builtin_lock(image).read_text() if image.builtin
                  else f"{image.parent}\n{image.layer_lock}")
        return hashlib.sha256(source.encode()).hexdigest()

    def _adopt(self, image: Image, final: Path) -> bool:
        """A complete build of this very image already at ``final`` (its record was lost, or
        another home sharing the images directory built it): record it instead of rebuilding."""
        try:
            marker = json.loads((final / _MARKER).read_text())
        except (FileNotFoundError, ValueError):
            return False
        if (marker.get("ref"), marker.get("digest")) != (image.ref, self._digest(image)):
            return False
        self._set(image, state=BuildState.READY, path=str(final), built_at=time.time(), error=None,
                  **marker["record"])
        return True

    def _path(self, image: Image) -> Path:
        return self.settings.images_dir / _slug(image.name) / str(image.version)

    def _builtin_lock(self, image: Image) -> Path:
        folder = resources.files("flowsession.environments") / _BUILTIN_DIR / _BUILTIN[image.name]
        return Path(str(folder / f"{image.version}.lock"))

    def _set(self, image: Image, **values) -> None:
        with self.store.engine.begin() as c:
            c.execute(update(images).where(images.c.name == image.name,
                                           images.c.version == image.version).values(**values))

    def _register_builtins(self) -> None:
        """Known built-in image versions get a row (DEFINED until first built)."""
        found = []
        for name, folder in _BUILTIN.items():
            base = resources.files("flowsession.environments") / _BUILTIN_DIR / folder
            for entry in base.iterdir():
                if entry.name.endswith(".lock") and entry.name[:-5].isdigit():
                    found.append((name, int(entry.name[:-5]), Path(str(entry))))
        with self.store.engine.begin() as c:
            have = {(r.name, r.version) for r in c.execute(
                select(images.c.name, images.c.version).where(images.c.builtin.is_(True)))}
            for name, version, lock in found:
                if (name, version) not in have:
                    c.execute(insert(images).values(
                        name=name, version=version, parent=None, builtin=True,
                        description="Python, promptflow-core and promptflow-tools",
                        requirements=lock.with_name("requirements.in").read_text(),
                        layer_lock="", state=BuildState.DEFINED, created_at=time.time()))
        for image in self.list():  # built already (by another home sharing the images)?
            if image.builtin and image.state == BuildState.DEFINED:
                self._adopt(image, self._path(image))


def _slug(name: str) -> str:
    return name.replace("/", "--")

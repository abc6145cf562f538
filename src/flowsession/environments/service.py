"""The environments service: a flow folder in, a ready environment out.

flow folder -> snapshot -> image (built on first use) -> requirements parsed under the rules ->
resolved against the image (the lock is kept, so a cache hit needs no resolver and no
network) -> ``env_id`` -> the cache builds it once, shared by every flow that needs the same.
The only writer of ``resolutions``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError

from flowsession.access.secrets import USER_IDENTITY, FeedSecrets
from flowsession.backends.compute.base import EnvRecipe, ImageDef
from flowsession.backends.uv import EnvSpec, ImageLayers, UvEnvBuilder
from flowsession.config import Settings
from flowsession.errors import RequirementsError
from flowsession.environments.buildlog import BuildLog
from flowsession.environments.cache import Environment, EnvironmentCache
from flowsession.environments.images import ImageService, flow_image
from flowsession.environments.requirements import (
    PRIVATE,
    FlowRequirements,
    parse_requirements,
)
from flowsession.flows.flowfile import load_flow
from flowsession.flows.registry import upload_root
from flowsession.flows.snapshot import Snapshot, make_snapshot
from flowsession.store import Store, open_store
from flowsession.store.tables import resolutions


@dataclass(frozen=True)
class Prepared:
    """What a flow needs, resolved: the input of a build (and of a session start)."""

    snapshot: Snapshot
    image: ImageLayers
    requirements: FlowRequirements
    spec: EnvSpec
    env_id: str
    note: str | None = None  # what became of the flow's environment.image, when not itself

    def provided_by_image(self) -> dict[str, str]:
        """The requirements' packages the image already has: name -> the image's version."""
        from packaging.requirements import InvalidRequirement, Requirement
        from packaging.utils import canonicalize_name

        have = {canonicalize_name(n): v for n, v in self.image.versions().items()}
        named = list(self.requirements.satisfied_by_image)
        for line in self.requirements.requirements:
            try:
                named.append(Requirement(line).name)
            except InvalidRequirement:
                continue
        return {canonicalize_name(n): have[canonicalize_name(n)] for n in named
                if canonicalize_name(n) in have}


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    origin: str  # "image" | "requirements"


class EnvironmentService:
    def __init__(self, settings: Settings, store: Store, *, builder: UvEnvBuilder | None = None):
        self.settings, self.store = settings, store
        self.builder = builder or UvEnvBuilder(settings.uv, default_index=settings.index_url)
        self.images = ImageService(settings, store, self.builder)
        self.cache = EnvironmentCache(settings, store, self.builder)
        self.secrets = FeedSecrets(settings, store)

    @classmethod
    def open(cls, settings: Settings | None = None) -> EnvironmentService:
        settings = settings or Settings.from_env()
        return cls(settings, open_store(settings.db_url))

    # --- a flow's environment -----------------------------------------------------------------

    async def prepare(self, flow: str | Path, *, identity: str = USER_IDENTITY,
                      refresh: bool = False, image: str | None = None) -> Prepared:
        """Snapshot the flow and resolve its requirements against its image (no build yet).
        ``image`` overrides the flow's ``environment.image`` (a session's advanced setting)."""
        snapshot = self.snapshot(flow)
        ref, note = flow_image(image or snapshot.flow.image)
        image = await self.images.ensure_built(ref)
        layers = self.images.layers(image)
        reqs = self._requirements(snapshot, layers)
        lock = await self._resolve(layers, reqs, identity=identity, refresh=refresh,
                                   name=snapshot.flow.folder.name)
        spec = EnvSpec(image=layers, lock=lock, requirements=reqs)
        return Prepared(snapshot, layers, reqs, spec, self.builder.env_id(spec), note)

    def snapshot(self, flow: str | Path) -> Snapshot:
        """The flow's snapshot, as every session runs it. An uploaded flow draws only on its
        own folder (includes and symlinks that lead out are refused); a folder of the server's
        machine keeps prompt flow's behaviour."""
        root = upload_root(self.settings, flow)
        return make_snapshot(load_flow(flow, root=root), self.settings.snapshots_dir)

    async def ensure_for_flow(self, flow: str | Path, *, identity: str = USER_IDENTITY,
                              holder: str | None = None, refresh: bool = False) -> Environment:
        prepared = await self.prepare(flow, identity=identity, refresh=refresh)
        return await self.ensure(prepared, identity=identity, holder=holder)

    async def ensure(self, prepared: Prepared, *, identity: str = USER_IDENTITY,
                     holder: str | None = None) -> Environment:
        credentials = self.secrets.credentials_for(prepared.requirements.feeds, identity=identity)
        _check_credentials(prepared.requirements, credentials)
        return await self.cache.ensure(prepared.spec, holder=holder, credentials=credentials)

    def remember(self, prepared: Prepared, *, holder: str | None = None) -> Environment:
        """The environment of ``prepared``, recorded but not built here: a backend that
        builds environments where its sessions run builds it from ``recipe``."""
        return self.cache.remember(prepared.spec, holder=holder)

    # --- recipes: what a node needs to build an image or an environment itself ----------------

    def image_recipe(self, image_ref: str) -> EnvRecipe:
        """The image alone (a standby's interpreter), as a node builds it."""
        chain, node = [], self.images.get(image_ref)
        while node is not None:
            chain.append(ImageDef(name=node.name, version=node.version, builtin=node.builtin,
                                  parent=node.parent, layer_lock=node.layer_lock,
                                  requirements=node.requirements,
                                  description=node.description))
            node = self.images.get(node.parent) if node.parent else None
        return EnvRecipe(image=chain[0].ref, images=tuple(chain),
                         index_url=self.settings.index_url)

    def recipe(self, prepared: Prepared, *, identity: str = USER_IDENTITY) -> EnvRecipe:
        """The flow's environment as a node builds it: its image, its lock, its feeds, and
        the feeds' secrets (``identity``'s), which travel in memory only."""
        reqs = dataclasses.replace(prepared.requirements, base_dir=None)
        credentials = self.secrets.credentials_for(reqs.feeds, identity=identity)
        return dataclasses.replace(self.image_recipe(prepared.image.ref),
                                   lock=prepared.spec.lock, requirements=reqs,
                                   credentials=credentials)

    async def create_image(self, name: str, *, base: str, requirements: Path,
                           description: str = "", identity: str = USER_IDENTITY,
                           confined: bool = False, on_line=None):
        """A custom image, its ``{private}`` feeds filled from ``identity``'s secrets.

        ``confined``: the requirements may name only index packages (no local files, no
        ``-r``/``-c`` includes): for text sent by someone who may not read the server's files."""
        if confined:
            parse_requirements(requirements, display="requirements", allow_local=False,
                               allow_includes=False)
        feeds = (parse_requirements(requirements, allow_local=True).feeds
                 if requirements.is_file() else ())
        credentials = self.secrets.credentials_for(feeds, identity=identity)
        return await self.images.create(name, base=base, requirements=requirements,
                                        description=description, credentials=credentials,
                                        on_line=on_line)

    def packages(self, env: Environment) -> list[Package]:
        """View installed packages: what the image provides and what the requirements add."""
        image = self.images.layers(self.images.get(env.image))
        out = [Package(n, v, "image") for n, v in image.versions().items()]
        out += [Package(n, v, "requirements") for n, v in env.packages().items()]
        return sorted(out, key=lambda p: (p.origin != "requirements", p.name))

    # --- helpers ---------------------------------------------------------------------------

    def _requirements(self, snapshot: Snapshot, image: ImageLayers) -> FlowRequirements:
        flow = snapshot.flow
        path = flow.requirements_path
        if path is None:
            return FlowRequirements(source=flow.requirements_file, base_dir=snapshot.path)
        return parse_requirements(path, display=flow.requirements_file,
                                  image_versions=image.versions(),
                                  root=snapshot.path if flow.root is not None else None)

    async def _resolve(self, image: ImageLayers, reqs: FlowRequirements, *, identity: str,
                       refresh: bool, name: str) -> str:
        key = hashlib.sha256(json.dumps({
            "image": image.ref, "image_digest": image.digest, "requirements": reqs.digest(),
            "default_index": self.settings.index_url or "",
        }, sort_keys=True).encode()).hexdigest()
        credentials = self.secrets.credentials_for(reqs.feeds, identity=identity)
        # what was resolved or built from a private feed is for those who hold its secret
        _check_credentials(reqs, credentials)
        if not refresh:
            with self.store.engine.connect() as c:
                row = c.execute(select(resolutions.c.lock).where(resolutions.c.key == key)).first()
            if row is not None:
                return row.lock
        log_path = self.settings.logs_dir / "resolve" / f"{key[:32]}.log"
        with BuildLog(log_path, secrets=credentials.values()) as log:
            log.step(f"resolving {reqs.source} of {name} against {image.ref}")
            lock = await self.builder.resolve(image, reqs, log, credentials=credentials)
        with self.store.engine.begin() as c:
            c.execute(resolutions.delete().where(resolutions.c.key == key))
            try:
                c.execute(insert(resolutions).values(key=key, image=image.ref, lock=lock,
                                                     created_at=time.time()))
            except IntegrityError:
                pass
        return lock


def _check_credentials(reqs: FlowRequirements, credentials: Mapping[str, str]) -> None:
    """Every ``{private}`` feed has a secret among ``credentials`` (the identity's), or the
    error a build would give: a lock resolved, or an environment built, from a private feed
    with someone else's secret is not handed to whoever asks for the same requirements."""
    for feed in reqs.feeds:
        if feed.needs_secret and feed.host not in credentials:
            raise RequirementsError(
                f"the feed at {feed.host} needs a secret ({PRIVATE}) and the identity has none "
                "for it", hint=f"add one with: flowsession feed set {feed.host}")

"""Images and environments on a node: the environments service on the node's own store and
folders, fed with recipes (``EnvRecipe``) from the control plane.

The node's home is ``Settings.node_home`` of the node's own settings (``FLOWSESSION_NODE_HOME``,
default ``FLOWSESSION_HOME/node``); ``FLOWSESSION_IMAGES_DIR`` may point at images built in
advance (a node image of a KubeRay cluster), which are adopted instead of built. Several
session actors of one node share it: the cache builds each environment once, across
processes, and counts each session as a holder.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from flowsession.backends.compute.base import EnvRecipe
from flowsession.backends.uv import EnvSpec, ImageLayers
from flowsession.config import Settings
from flowsession.environments.cache import Environment
from flowsession.environments.service import EnvironmentService
from flowsession.store import Store, open_store


def node_settings(settings: Settings | None = None) -> Settings:
    """This node's settings: its home is the node home."""
    settings = settings or Settings.from_env()
    home = settings.node_home
    return dataclasses.replace(settings, home=home, node_home_path=home, database_url=None)


class NodeEnvironments:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._store: Store | None = None

    @property
    def store(self) -> Store:
        if self._store is None:
            self.settings.home.mkdir(parents=True, exist_ok=True)
            self._store = open_store(self.settings.db_url)
        return self._store

    def service(self, recipe: EnvRecipe) -> EnvironmentService:
        settings = dataclasses.replace(self.settings, index_url=recipe.index_url)
        return EnvironmentService(settings, self.store)

    async def image(self, recipe: EnvRecipe) -> tuple[ImageLayers, str]:
        """The recipe's image, built (or adopted) here, parents first: its layers and its
        interpreter."""
        svc = self.service(recipe)
        for image in reversed(recipe.images):
            svc.images.define(image)
        for image in reversed(recipe.images):
            built = await svc.images.ensure_built(image.ref)
        layers = svc.images.layers(built)
        return layers, str(Path(built.path or "") / "bin" / "python")

    async def environment(self, recipe: EnvRecipe, *, holder: str) -> Environment:
        """The recipe's environment, built here once (the image first), held by ``holder``."""
        layers, _python = await self.image(recipe)
        spec = EnvSpec(image=layers, lock=recipe.lock, requirements=recipe.requirements)
        return await self.service(recipe).cache.ensure(spec, holder=holder,
                                                       credentials=dict(recipe.credentials))

    def release(self, env_id: str, holder: str) -> None:
        EnvironmentService(self.settings, self.store).cache.release(env_id, holder)

    @property
    def read_only_paths(self) -> tuple[str, ...]:
        """What a session binds read-only: the images only (its environment's packages are
        linked into its slot, ``Slot.place_env``)."""
        return (str(self.settings.images_dir),)

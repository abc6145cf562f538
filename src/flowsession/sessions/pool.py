"""The standby pool: supervisors for the default image started in advance with the runtime
imported, so a new session adopts one instead of paying the import. Environments only add
packages the image lacks, so a standby can serve any flow of its image. The sessions service is
the only writer of ``standby``.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
import time
from pathlib import Path

from sqlalchemy import delete, insert, select

from flowsession.backends.compute.base import (
    ComputeBackend,
    ComputeHandle,
    EnvHandle,
    SessionHandle,
)
from flowsession.config import Settings
from flowsession.environments.images import DEFAULT_IMAGE
from flowsession.environments.service import EnvironmentService
from flowsession.environments.state import BuildState
from flowsession.store import Store
from flowsession.store.tables import standby

STANDBY_IDLE_S = 3600.0  # an unused standby ends itself after this long


class StandbyPool:
    def __init__(self, settings: Settings, store: Store, backend: ComputeBackend,
                 envs: EnvironmentService):
        self.settings, self.store, self.backend, self.envs = settings, store, backend, envs

    def image_env(self, image_ref: str) -> EnvHandle:
        """The image's interpreter (here), and, for a backend that builds environments where
        its sessions run, the image's recipe."""
        image = self.envs.images.get(image_ref)
        recipe = (self.envs.image_recipe(image.ref) if self.backend.builds_environments
                  else None)
        return EnvHandle(env_id="", python=str(Path(image.path or "") / "bin" / "python"),
                         image_ref=image.ref, site_dirs=(),
                         read_only_paths=(str(self.settings.images_dir),), recipe=recipe)

    def pooled_image(self) -> str | None:
        """The image the pool keeps standbys for (the newest default image, once built)."""
        if self.settings.standby_pool_size <= 0:
            return None
        image = self.envs.images.get(DEFAULT_IMAGE)
        return image.ref if image.state == BuildState.READY else None

    async def claim_or_start(self, image_ref: str, *,
                             compute: ComputeHandle | None = None) -> SessionHandle:
        """A standby supervisor for ``image_ref``: one from the pool, or a new one (on
        ``compute``, the start's own, for a backend that places sessions there)."""
        if image_ref == self.pooled_image():
            claimed = self.claim(image_ref)
            if claimed is not None:
                return claimed
        handle = await self.backend.start_standby(self.image_env(image_ref),
                                                  idle_timeout_s=STANDBY_IDLE_S,
                                                  compute=compute)
        return handle

    def claim(self, image_ref: str) -> SessionHandle | None:
        with self.store.engine.connect() as c:
            rows = c.execute(select(standby).where(standby.c.image == image_ref)
                             .order_by(standby.c.created_at)).all()
        for row in rows:
            with self.store.engine.begin() as c:  # the DELETE is the claim: one winner
                won = c.execute(delete(standby).where(standby.c.id == row.id)).rowcount == 1
            handle = SessionHandle.from_json(json.loads(row.handle))
            if won and self.backend.alive(handle):
                return replace(handle, from_standby=True)
        return None

    def members(self) -> list[SessionHandle]:
        with self.store.engine.connect() as c:
            rows = c.execute(select(standby).order_by(standby.c.created_at)).all()
        return [SessionHandle.from_json(json.loads(r.handle)) for r in rows]

    async def fill(self) -> int:
        """Start standbys until the pool holds its size. Returns how many were started."""
        image_ref = self.pooled_image()
        if image_ref is None:
            return 0
        alive = 0
        for row_handle in self.members():
            if self.backend.alive(row_handle):
                alive += 1
            else:
                self._forget(row_handle.session_id)
        started = 0
        for _ in range(self.settings.standby_pool_size - alive):
            handle = await self.backend.start_standby(self.image_env(image_ref),
                                                      idle_timeout_s=STANDBY_IDLE_S)
            with self.store.engine.begin() as c:
                c.execute(insert(standby).values(id=handle.session_id, image=image_ref,
                                                 state="READY", handle=handle.json_text(),
                                                 created_at=time.time()))
            started += 1
        return started

    async def drain(self) -> int:
        handles = self.members()
        for handle in handles:
            self._forget(handle.session_id)
            await self.backend.stop_session(handle, reason="standby pool drained")
        return len(handles)

    async def discard(self, task: asyncio.Task) -> None:
        """Stop a standby that was being started for a start that failed."""
        if not task.done():
            task.cancel()
        try:
            handle = await task
        except BaseException:
            return
        await self.backend.stop_session(handle, reason="the start it was for failed")

    def _forget(self, standby_id: str) -> None:
        with self.store.engine.begin() as c:
            c.execute(delete(standby).where(standby.c.id == standby_id))

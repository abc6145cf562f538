"""Package-feed secrets per identity and host. The only writer of ``feed_secrets``.

Secrets are encrypted (Fernet) with a key kept in its own file (mode 0600) beside the database,
so a copy of the database alone reveals nothing. They are decrypted only to hand to a build.
``cipher`` is that one key's cipher, shared with the connections (``access.connections``).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite

from flowsession.access import USER_IDENTITY
from flowsession.config import Settings
from flowsession.environments.requirements import Feed
from flowsession.errors import InvalidInput, NotFound
from flowsession.store import Store
from flowsession.store.tables import feed_secrets

if TYPE_CHECKING:
    from cryptography.fernet import Fernet



def holder(identity: str | None, owner: str) -> str:
    """Under which name feed secrets are kept: a managed identity's own name, or -- for the
    user's own identity -- ``user:<owner>``, so that one user's feed credentials never fill
    another user's builds."""
    if identity in (None, "", USER_IDENTITY):
        return f"{USER_IDENTITY}:{owner}"
    return identity


def mask(secret: str) -> str:
    user, sep, _ = secret.partition(":")
    return f"{user}:****" if sep else "****"


def cipher(settings: Settings) -> Fernet:
    """The Fernet cipher for every stored secret (feed secrets, connections), keyed by
    ``settings.secret_key_file``; the key file is created (mode 0600) on first use."""
    from cryptography.fernet import Fernet  # imported only when a secret is used

    path = settings.secret_key_file
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # write a complete key under a private name, then link it into place: two processes
        # creating it at once agree on one key, and nobody reads a half-written file
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(Fernet.generate_key())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another process made it first: use theirs
            except OSError:  # a file system without hard links
                with contextlib.suppress(FileExistsError):
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    with os.fdopen(fd, "wb") as fh:
                        fh.write(tmp.read_bytes())
        finally:
            tmp.unlink(missing_ok=True)
    return Fernet(path.read_bytes())


class FeedSecrets:
    def __init__(self, settings: Settings, store: Store):
        self.settings, self.store = settings, store
        self._fernet: Fernet | None = None

    def _cipher(self) -> Fernet:
        if self._fernet is None:
            self._fernet = cipher(self.settings)
        return self._fernet

    def set(self, host: str, secret: str, *, identity: str = USER_IDENTITY) -> None:
        host = host.strip().lower()
        if not host or "/" in host or "@" in host:
            raise InvalidInput(f"'{host}' is not a host name",
                               hint="give the feed's host, e.g. pkgs.example.com or 10.0.0.5:8080")
        if not secret:
            raise InvalidInput("the secret is empty", hint="give 'user:token' or a token")
        values = dict(identity=identity, host=host, ciphertext=self._cipher().encrypt(
            secret.encode()), created_at=time.time())
        dialect = postgresql if self.store.engine.dialect.name == "postgresql" else sqlite
        stmt = dialect.insert(feed_secrets).values(**values)
        stmt = stmt.on_conflict_do_update(index_elements=["identity", "host"], set_=values)
        with self.store.engine.begin() as c:
            c.execute(stmt)

    def delete(self, host: str, *, identity: str = USER_IDENTITY) -> None:
        with self.store.engine.begin() as c:
            n = c.execute(delete(feed_secrets).where(feed_secrets.c.identity == identity,
                                                     feed_secrets.c.host == host.lower())).rowcount
        if not n:
            raise NotFound(f"identity '{identity}' has no secret for {host}")

    def list(self, *, identity: str | None = None) -> list[dict]:
        q = select(feed_secrets).order_by(feed_secrets.c.identity, feed_secrets.c.host)
        if identity:
            q = q.where(feed_secrets.c.identity == identity)
        with self.store.engine.connect() as c:
            rows = c.execute(q).all()
        return [{"identity": r.identity, "host": r.host, "secret": mask(self._decrypt(r.ciphertext)),
                 "created_at": r.created_at} for r in rows]

    def hosts(self, *, identity: str | None = None) -> dict[str, list[str]]:
        """identity -> the hosts it holds a secret for (nothing is decrypted)."""
        q = select(feed_secrets.c.identity, feed_secrets.c.host).order_by(
            feed_secrets.c.identity, feed_secrets.c.host)
        if identity is not None:
            q = q.where(feed_secrets.c.identity == identity)
        out: dict[str, list[str]] = {}
        with self.store.engine.connect() as c:
            for r in c.execute(q):
                out.setdefault(r.identity, []).append(r.host)
        return out

    def delete_all(self, *, identity: str) -> int:
        """Forget every secret of ``identity`` (a managed identity being deleted)."""
        with self.store.engine.begin() as c:
            return c.execute(delete(feed_secrets).where(
                feed_secrets.c.identity == identity)).rowcount

    def credentials_for(self, feeds: Iterable[Feed], *, identity: str = USER_IDENTITY
                        ) -> dict[str, str]:
        """host -> secret for each feed whose URL holds ``{private}`` (only those)."""
        hosts = {f.host.lower() for f in feeds if f.needs_secret}
        if not hosts:
            return {}
        with self.store.engine.connect() as c:
            rows = c.execute(select(feed_secrets).where(feed_secrets.c.identity == identity,
                                                        feed_secrets.c.host.in_(hosts))).all()
        return {r.host: self._decrypt(r.ciphertext) for r in rows}

    def _decrypt(self, token: bytes) -> str:
        return self._cipher().decrypt(token).decode()

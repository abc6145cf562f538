"""Managed identities: named, workspace-level sets of credentials. The only writer of
``identities``.

A session runs as the user's own identity (``user``) or as a managed identity. A managed
identity holds:

- package-feed secrets per host: rows of ``feed_secrets`` under the identity's name, written
  through ``FeedSecrets`` (they fill ``{private}`` feeds when the session's environment or a
  custom image is built);
- the names of the connections it gives access to: a run on a session of this identity gets
  them (by name, whoever owns them) besides its owner's own (``ConnectionService.
  for_executor_as``).

Which identities a user may use is a scope, ``identities:use:NAME`` (``Principal.
can_use_identity``); this module knows nothing of principals. Nothing here returns a secret.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from flowsession.access.secrets import USER_IDENTITY, FeedSecrets
from flowsession.config import Settings
from flowsession.errors import Conflict, InvalidInput, NotFound
from flowsession.store import Store
from flowsession.store.tables import identities

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}$")
_CONNECTION = re.compile(r"^[A-Za-z0-9_-]{1,200}$")  # as access.connections.NAME_RE


def is_managed(identity: str | None) -> bool:
    """A managed identity's name (not the user's own, not unset)."""
    return bool(identity) and identity != USER_IDENTITY


@dataclass(frozen=True)
class Identity:
    name: str
    description: str
    connections: tuple[str, ...]
    feed_hosts: tuple[str, ...]  # hosts it holds a feed secret for (never the secrets)
    created_by: str
    created_at: float

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description,
                "connections": list(self.connections), "feed_hosts": list(self.feed_hosts),
                "created_by": self.created_by, "created_at": self.created_at}


def allowed_connections(store: Store, identity: str | None) -> frozenset[str]:
    """The connection names ``identity`` gives access to: none for the user's own identity
    or for one that does not exist (any more)."""
    if not is_managed(identity):
        return frozenset()
    with store.engine.connect() as c:
        row = c.execute(select(identities.c.connections)
                        .where(identities.c.name == identity)).first()
    return frozenset(json.loads(row.connections)) if row else frozenset()


class IdentityService:
    def __init__(self, settings: Settings, store: Store, clock: Callable[[], float] = time.time):
        self.settings, self.store, self.clock = settings, store, clock
        self.secrets = FeedSecrets(settings, store)

    # --- reading ---------------------------------------------------------------------------

    def list(self) -> list[Identity]:
        with self.store.engine.connect() as c:
            rows = c.execute(select(identities).order_by(identities.c.name)).all()
        hosts = self.secrets.hosts()
        return [self._identity(r, hosts.get(r.name, ())) for r in rows]

    def get(self, name: str) -> Identity:
        with self.store.engine.connect() as c:
            row = c.execute(select(identities).where(identities.c.name == name)).first()
        if row is None:
            raise NotFound(f"identity {name!r} does not exist",
                           hint="list the identities: GET /api/identities",
                           details={"identity": name})
        return self._identity(row, self.secrets.hosts(identity=name).get(name, ()))

    def check_usable(self, identity: str | None) -> None:
        """The user's own identity, or a managed identity that exists (NotFound otherwise)."""
        if is_managed(identity):
            self.get(identity)

    def connections_of(self, identity: str | None) -> frozenset[str]:
        return allowed_connections(self.store, identity)

    # --- writing ---------------------------------------------------------------------------

    def create(self, name: str, *, by: str, description: str = "",
               connections: Iterable[str] = ()) -> Identity:
        if not _NAME.match(name):
            raise InvalidInput(f"identity name {name!r} is not valid",
                               hint="letters, digits, '_', '.' and '-' (at most 200)",
                               details={"field": "name"})
        if name == USER_IDENTITY:
            raise InvalidInput(f"'{USER_IDENTITY}' is the name of each user's own identity",
                               hint="choose another name", details={"field": "name"})
        names = _connection_names(connections)
        try:
            with self.store.engine.begin() as c:
                c.execute(insert(identities).values(
                    name=name, description=description, connections=json.dumps(names),
                    created_by=by, created_at=self.clock()))
        except IntegrityError:
            raise Conflict(f"identity {name!r} exists", details={"identity": name}) from None
        return self.get(name)

    def set_connections(self, name: str, connections: Iterable[str]) -> Identity:
        """Replace the connections ``name`` gives access to."""
        names = _connection_names(connections)
        with self.store.engine.begin() as c:
            if c.execute(update(identities).where(identities.c.name == name)
                         .values(connections=json.dumps(names))).rowcount != 1:
                raise NotFound(f"identity {name!r} does not exist", details={"identity": name})
        return self.get(name)

    def forget_connection(self, connection: str) -> list[str]:
        """A deleted connection leaves every identity (a new one of the same name, perhaps
        another user's, is not given away). Returns the identities that listed it."""
        changed = []
        with self.store.engine.begin() as c:
            for row in c.execute(select(identities.c.name, identities.c.connections)).all():
                names = json.loads(row.connections)
                if connection in names:
                    c.execute(update(identities).where(identities.c.name == row.name).values(
                        connections=json.dumps([n for n in names if n != connection])))
                    changed.append(row.name)
        return changed

    def set_feed_secret(self, name: str, host: str, secret: str) -> Identity:
        """Store (or replace) the secret that fills ``{private}`` for ``host`` when building
        as ``name``."""
        self.get(name)
        self.secrets.set(host, secret, identity=name)
        return self.get(name)

    def delete_feed_secret(self, name: str, host: str) -> Identity:
        self.get(name)
        self.secrets.delete(host, identity=name)
        return self.get(name)

    def delete(self, name: str) -> None:
        """The identity and its feed secrets. (Whether a session still uses it is the
        caller's question: see the API.)"""
        with self.store.engine.begin() as c:
            if c.execute(delete(identities).where(identities.c.name == name)).rowcount != 1:
                raise NotFound(f"identity {name!r} does not exist", details={"identity": name})
        self.secrets.delete_all(identity=name)

    # --- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _identity(row, hosts: Iterable[str]) -> Identity:
        return Identity(name=row.name, description=row.description,
                        connections=tuple(json.loads(row.connections)),
                        feed_hosts=tuple(sorted(hosts)), created_by=row.created_by,
                        created_at=row.created_at)


def _connection_names(connections: Iterable[str]) -> list[str]:
    names = sorted(set(connections))
    for n in names:
        if not isinstance(n, str) or not _CONNECTION.match(n):
            raise InvalidInput(f"{n!r} is not a connection name",
                               hint="letters, digits, '_' and '-' only",
                               details={"field": "connections"})
    return names

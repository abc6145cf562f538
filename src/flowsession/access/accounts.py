"""Users, API tokens, roles (sets of scopes) and role assignments. The only writer of
``users``, ``api_tokens``, ``roles`` and ``role_assignments``.

A token is ``fs_<id>_<secret>``: the id finds the row, and only a SHA-256 of the secret is
stored, so a copy of the database cannot be used to log in. A token is shown once, when made.
A principal's scopes are read on every request, so a change of role applies to the next one.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from flowsession.errors import Conflict, InvalidInput, NotFound
from flowsession.store import Store
from flowsession.store.tables import api_tokens, role_assignments, roles, users

# --- scopes ----------------------------------------------------------------------------------

# "<resource>:<verb>". ``*:read`` style wildcards are allowed in roles.
SCOPES = {
    "images:read": "list and show images",
    "images:write": "create and build images",
    "environments:read": "show environments and their packages",
    "environments:write": "build and remove environments",
    "computes:read": "list and show your computes",
    "computes:write": "create, start, stop and delete your computes",
    "sessions:read": "show your sessions, their events and packages",
    "sessions:write": "start, install, reset, update and stop your sessions; test lines",
    "runs:read": "show your runs, their details, metrics and logs",
    "runs:write": "submit and cancel runs",
    "flows:read": "list flows and read their files",
    "flows:write": "register flows and write their files (Save only)",
    "connections:read": "list and show connections (secrets masked)",
    "connections:write": "create, update and delete connections",
    "identities:read": "list managed identities",
    "identities:write": "create managed identities and set their credentials",
    "identities:use": "use managed identities (identities:use:NAME for one)",
    "users:read": "list users and their roles",
    "users:write": "create users and issue their tokens",
    "roles:write": "define custom roles",
    "roleAssignments:write": "assign and remove roles",
    "audit:read": "read the audit log",
    "all:manage": "see and stop every user's computes, sessions and runs",
}

OWNER, DATA_SCIENTIST, READER = "Owner", "Data Scientist", "Reader"
BUILTIN_ROLES = {
    OWNER: ("everything, including role assignment", ["*"]),
    DATA_SCIENTIST: ("use images, start and manage your own computes and sessions, submit runs",
                     ["images:read", "environments:*", "computes:*", "sessions:*", "runs:*",
                      "flows:*", "connections:*", "identities:read"]),
    READER: ("read", ["images:read", "environments:read", "computes:read", "sessions:read",
                      "runs:read", "flows:read", "connections:read", "identities:read"]),
}
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@-]{0,199}$")
_ROLE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9 _.-]{0,199}$")
_TOKEN = re.compile(r"^fs_([a-z0-9]{12})_([A-Za-z0-9_-]{20,})$")


def allows(granted: Iterable[str], scope: str) -> bool:
    """Does a set of granted scopes (with wildcards) include ``scope``?"""
    return any(g == scope or fnmatch.fnmatchcase(scope, g) for g in granted)


def check_scope(scope: str) -> str:
    base = scope.split(":", 2)
    known = f"{base[0]}:{base[1]}" if len(base) > 1 else scope
    if scope == "*" or known in SCOPES or "*" in scope:
        return scope
    raise InvalidInput(f"unknown scope {scope!r}",
                       hint="scopes: " + ", ".join(sorted(SCOPES)), details={"scope": scope})


@dataclass(frozen=True)
class Principal:
    """Who makes a request, and what they may do (read fresh on each request)."""

    user: str
    scopes: frozenset[str]
    roles: tuple[str, ...]
    token_id: str | None = None

    def can(self, scope: str) -> bool:
        return allows(self.scopes, scope)

    @property
    def manages_all(self) -> bool:
        return self.can("all:manage")

    def can_use_identity(self, name: str) -> bool:
        return name in ("user", "") or self.can(f"identities:use:{name}") or self.can(
            "identities:use")


@dataclass(frozen=True)
class Token:
    id: str
    user: str
    label: str
    created_at: float
    last_used_at: float | None
    revoked_at: float | None


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Accounts:
    def __init__(self, store: Store, clock: Callable[[], float] = time.time):
        self.store, self.clock = store, clock

    def ensure_builtin_roles(self) -> None:
        with self.store.engine.begin() as conn:
            have = set(conn.execute(select(roles.c.name)).scalars())
            for name, (description, scopes) in BUILTIN_ROLES.items():
                if name not in have:
                    conn.execute(insert(roles).values(
                        name=name, description=description, scopes=json.dumps(scopes),
                        builtin=True, created_at=self.clock()))

    # --- users -----------------------------------------------------------------------------

    def create_user(self, name: str, *, display_name: str = "") -> None:
        if not _NAME.match(name):
            raise InvalidInput(f"user name {name!r} is not valid",
                               hint="letters, digits, '_', '.', '@' and '-'",
                               details={"field": "name"})
        try:
            with self.store.engine.begin() as conn:
                conn.execute(insert(users).values(name=name, display_name=display_name,
                                                  disabled=False, created_at=self.clock()))
        except IntegrityError:
            raise Conflict(f"user {name!r} exists", details={"user": name}) from None

    def user_exists(self, name: str) -> bool:
        with self.store.engine.connect() as conn:
            return conn.execute(select(users.c.name).where(users.c.name == name)).first() \
                is not None

    def list_users(self) -> list[dict]:
        with self.store.engine.connect() as conn:
            rows = conn.execute(select(users).order_by(users.c.name)).all()
            assigned = conn.execute(select(role_assignments)).all()
        by_user: dict[str, list[str]] = {}
        for a in assigned:
            by_user.setdefault(a.user, []).append(a.role)
        return [{"name": r.name, "display_name": r.display_name, "disabled": r.disabled,
                 "roles": sorted(by_user.get(r.name, [])), "created_at": r.created_at}
                for r in rows]

    def set_disabled(self, name: str, disabled: bool) -> None:
        with self.store.engine.begin() as conn:
            if conn.execute(update(users).where(users.c.name == name)
                            .values(disabled=disabled)).rowcount != 1:
                raise NotFound(f"user {name!r} does not exist", details={"user": name})

    # --- tokens ----------------------------------------------------------------------------

    def issue_token(self, user: str, *, label: str = "") -> tuple[str, Token]:
        """A new token for ``user``: the secret is returned here and never again."""
        if not self.user_exists(user):
            raise NotFound(f"user {user!r} does not exist", details={"user": user})
        token_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        with self.store.engine.begin() as conn:
            conn.execute(insert(api_tokens).values(
                id=token_id, user=user, label=label, secret_hash=_hash(secret),
                created_at=self.clock()))
        return f"fs_{token_id}_{secret}", self.token(token_id)

    def token(self, token_id: str) -> Token:
        with self.store.engine.connect() as conn:
            r = conn.execute(select(api_tokens).where(api_tokens.c.id == token_id)).first()
        if r is None:
            raise NotFound(f"token {token_id!r} does not exist", details={"token": token_id})
        return Token(r.id, r.user, r.label, r.created_at, r.last_used_at, r.revoked_at)

    def tokens(self, user: str | None = None) -> list[Token]:
        q = select(api_tokens).order_by(api_tokens.c.created_at)
        if user is not None:
            q = q.where(api_tokens.c.user == user)
        with self.store.engine.connect() as conn:
            return [Token(r.id, r.user, r.label, r.created_at, r.last_used_at, r.revoked_at)
                    for r in conn.execute(q)]

    def revoke(self, token_id: str) -> None:
        with self.store.engine.begin() as conn:
            if conn.execute(update(api_tokens).where(api_tokens.c.id == token_id)
                            .values(revoked_at=self.clock())).rowcount != 1:
                raise NotFound(f"token {token_id!r} does not exist", details={"token": token_id})

    def authenticate(self, presented: str) -> Principal | None:
        """The principal of a valid token; None for anything else (missing, malformed,
        unknown, wrong secret, revoked, disabled user) -- the caller says 401, no more."""
        m = _TOKEN.match(presented or "")
        if not m:
            return None
        token_id, secret = m.groups()
        with self.store.engine.connect() as conn:
            r = conn.execute(select(api_tokens).where(api_tokens.c.id == token_id)).first()
            if r is None or r.revoked_at is not None:
                return None
            if not hmac.compare_digest(r.secret_hash, _hash(secret)):
                return None
            u = conn.execute(select(users).where(users.c.name == r.user)).first()
        if u is None or u.disabled:
            return None
        return self.principal(r.user, token_id=token_id)

    def principal(self, user: str, *, token_id: str | None = None) -> Principal:
        with self.store.engine.connect() as conn:
            names = list(conn.execute(select(role_assignments.c.role)
                                      .where(role_assignments.c.user == user)).scalars())
            rows = conn.execute(select(roles).where(roles.c.name.in_(names))).all()
        scopes = frozenset(s for r in rows for s in json.loads(r.scopes))
        return Principal(user=user, scopes=scopes, roles=tuple(sorted(names)),
                         token_id=token_id)

    # --- roles -----------------------------------------------------------------------------

    def list_roles(self) -> list[dict]:
        with self.store.engine.connect() as conn:
            rows = conn.execute(select(roles).order_by(roles.c.builtin.desc(),
                                                       roles.c.name)).all()
        return [{"name": r.name, "description": r.description,
                 "scopes": json.loads(r.scopes), "builtin": r.builtin} for r in rows]

    def create_role(self, name: str, scopes: list[str], *, description: str = "") -> None:
        if not _ROLE.match(name):
            raise InvalidInput(f"role name {name!r} is not valid", details={"field": "name"})
        if not scopes:
            raise InvalidInput("a role needs at least one scope", details={"field": "scopes"})
        for s in scopes:
            check_scope(s)
        try:
            with self.store.engine.begin() as conn:
                conn.execute(insert(roles).values(name=name, description=description,
                                                  scopes=json.dumps(sorted(set(scopes))),
                                                  builtin=False, created_at=self.clock()))
        except IntegrityError:
            raise Conflict(f"role {name!r} exists", details={"role": name}) from None

    def delete_role(self, name: str) -> None:
        with self.store.engine.begin() as conn:
            r = conn.execute(select(roles).where(roles.c.name == name)).first()
            if r is None:
                raise NotFound(f"role {name!r} does not exist", details={"role": name})
            if r.builtin:
                raise Conflict(f"role {name!r} is built in and cannot be deleted")
            conn.execute(delete(role_assignments).where(role_assignments.c.role == name))
            conn.execute(delete(roles).where(roles.c.name == name))

    def assign(self, user: str, role: str, *, by: str) -> None:
        if not self.user_exists(user):
            raise NotFound(f"user {user!r} does not exist", details={"user": user})
        with self.store.engine.begin() as conn:
            if conn.execute(select(roles.c.name).where(roles.c.name == role)).first() is None:
                raise NotFound(f"role {role!r} does not exist", details={"role": role})
            try:
                with conn.begin_nested():
                    conn.execute(insert(role_assignments).values(
                        user=user, role=role, assigned_by=by, created_at=self.clock()))
            except IntegrityError:
                pass  # already assigned: nothing to do

    def unassign(self, user: str, role: str) -> None:
        with self.store.engine.begin() as conn:
            if conn.execute(delete(role_assignments).where(
                    (role_assignments.c.user == user) & (role_assignments.c.role == role))
                    ).rowcount != 1:
                raise NotFound(f"user {user!r} does not have role {role!r}")

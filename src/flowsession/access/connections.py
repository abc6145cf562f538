"""prompt flow connections (OpenAI, Azure OpenAI, custom) per owner. The only writer of
``connections``.

A connection is read from prompt flow's connection YAML. Its configs are stored as JSON text;
its secrets as one Fernet token (of a JSON object) made with the same key as the feed secrets
(``access.secrets.cipher``), so the database alone reveals no secret. Secrets are decrypted
only to hand to a flow's executor (``for_executor``, ``for_executor_as``); everything shown to
people masks them.

Connection names are unique across owners. A run gets its owner's connections, and, when its
session runs as a managed identity, the connections that identity gives access to, whoever owns
them (``usable_names`` / ``for_executor_as``; ``access.identities`` keeps the lists).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from flowsession.access import MASK
from flowsession.access.secrets import cipher
from flowsession.config import Settings
from flowsession.errors import Conflict, FlowSessionError, InvalidInput, NotFound
from flowsession.store import Store, open_store
from flowsession.store.tables import connections

if TYPE_CHECKING:
    from cryptography.fernet import Fernet

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,200}$")
_ENV_RE = re.compile(r"^\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}$")
# placeholders left in prompt flow's sample connection files
_PLACEHOLDERS = ("<user-input>", "<to-be-replaced>")
_NO_CHANGE = "<no-change>"  # prompt flow: on update, keep the stored value
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_CREATE_HINT = "create it with: flowsession connection create --file CONNECTION.yaml"


@dataclass(frozen=True)
class _Kind:
    type: str  # as written in the YAML
    class_name: str  # promptflow's class (the executor's "type")
    required: tuple[str, ...] = ()  # config fields
    optional: tuple[tuple[str, str | None], ...] = ()  # config fields and their defaults
    secrets: tuple[str, ...] = ()  # secret fields (all required); custom: any under 'secrets'

    @property
    def fields(self) -> tuple[str, ...]:
        if self.type == "custom":
            return ("configs", "secrets")
        return (*self.secrets, *self.required, *(k for k, _ in self.optional))


KINDS: dict[str, _Kind] = {k.type: k for k in (
    _Kind("open_ai", "OpenAIConnection", optional=(("organization", None), ("base_url", None)),
          secrets=("api_key",)),
    _Kind("azure_open_ai", "AzureOpenAIConnection", required=("api_base",),
          optional=(("api_type", "azure"), ("api_version", "2024-02-01")), secrets=("api_key",)),
    _Kind("custom", "CustomConnection"),
)}
# also accepted for 'type': promptflow's own names (OpenAI, AzureOpenAI, Custom), any case
_TYPE_ALIASES = {**{k: k for k in KINDS}, "openai": "open_ai", "azureopenai": "azure_open_ai"}
_COMMON_FIELDS = ("$schema", "name", "type")


@dataclass(frozen=True)
class Connection:
    name: str
    type: str
    owner: str
    configs: dict[str, Any]
    secret_keys: list[str]
    created_at: float
    updated_at: float

    def to_dict(self) -> dict:
        """What may be shown: configs, and each secret as ``******`` (never its value).

        As prompt flow shows them: a custom connection's configs and secrets nested, a typed
        connection's fields flat."""
        masked = {k: MASK for k in self.secret_keys}
        body = ({"configs": dict(self.configs), "secrets": masked} if self.type == "custom"
                else {**masked, **self.configs})
        return {"name": self.name, "type": self.type, "owner": self.owner, **body,
                "created_at": self.created_at, "updated_at": self.updated_at}


class ConnectionService:
    def __init__(self, settings: Settings, store: Store):
        self.settings, self.store = settings, store
        self._fernet: Fernet | None = None

    @classmethod
    def open(cls, settings: Settings | None = None) -> ConnectionService:
        settings = settings or Settings.from_env()
        return cls(settings, open_store(settings.db_url))

    # --- creating -------------------------------------------------------------------------

    def create_from_file(self, path: str | os.PathLike[str], *, owner: str,
                         name: str | None = None) -> tuple[Connection, bool]:
        """Create (or update, if ``owner`` has one of that name) the connection in the YAML
        file at ``path``; ``name`` replaces the file's name. Returns (connection, created)."""
        file, text, data = _load_file(path, name)
        return self._create(data, owner=owner, source=str(file), text=text)

    def create(self, data: Mapping[str, Any], *, owner: str, source: str = "",
               allow_env: bool = True) -> tuple[Connection, bool]:
        """Create (or update) a connection from its YAML's content; ``source`` names the file
        in errors. Returns (connection, created).

        ``allow_env=False`` refuses ``${env:VAR}`` values: over the API they would read the
        server's environment, not the caller's."""
        return self._create(data, owner=owner, source=source, text=None, allow_env=allow_env)

    def _create(self, data: Any, *, owner: str, source: str, text: str | None,
                allow_env: bool = True) -> tuple[Connection, bool]:
        spec = _Parser(source, text, allow_env=allow_env).parse(data)
        now = time.time()
        for attempt in range(2):  # a second time if another process inserted the name first
            try:
                with self.store.engine.begin() as c:
                    row = c.execute(select(connections).where(
                        connections.c.name == spec.name)).first()
                    if row is not None and row.owner != owner:
                        raise Conflict(f"the connection name '{spec.name}' is already taken",
                                       hint="choose another name (--name NAME)")
                    # an update may keep stored secrets (a masked or empty value)
                    secrets = spec.resolve_secrets(self._decrypt(row) if row is not None else None)
                    values = dict(type=spec.type, configs=json.dumps(spec.configs),
                                  secrets=self._cipher().encrypt(json.dumps(secrets).encode()),
                                  updated_at=now)
                    if row is None:
                        c.execute(insert(connections).values(name=spec.name, owner=owner,
                                                             created_at=now, **values))
                    else:
                        c.execute(update(connections).where(
                            connections.c.name == spec.name,
                            connections.c.owner == owner).values(**values))
                break
            except IntegrityError:
                if attempt:
                    raise
        created = row is None
        log.info("%s connection %s (%s) of %s", "created" if created else "updated", spec.name,
                 spec.type, owner)
        return Connection(name=spec.name, type=spec.type, owner=owner, configs=spec.configs,
                          secret_keys=list(secrets), created_at=now if created else
                          row.created_at, updated_at=now), created

    # --- reading --------------------------------------------------------------------------

    def list(self, owner: str | None) -> list[Connection]:
        """``owner``'s connections; every owner's with None."""
        q = select(connections).order_by(connections.c.name)
        if owner is not None:
            q = q.where(connections.c.owner == owner)
        with self.store.engine.connect() as c:
            rows = c.execute(q).all()
        return [self._connection(r) for r in rows]

    def get(self, name: str, *, owner: str) -> Connection:
        return self._connection(self._row(name, owner))

    def find(self, name: str) -> Connection:
        """The connection of that name, whoever owns it (names are unique across owners)."""
        with self.store.engine.connect() as c:
            row = c.execute(select(connections).where(connections.c.name == name)).first()
        if row is None:
            raise _not_found([name])
        return self._connection(row)

    def delete(self, name: str, *, owner: str) -> None:
        with self.store.engine.begin() as c:
            n = c.execute(delete(connections).where(connections.c.name == name,
                                                    connections.c.owner == owner)).rowcount
        if not n:
            raise _not_found([name])
        log.info("deleted connection %s of %s", name, owner)

    def for_executor(self, names: Iterable[str], *, owner: str) -> dict[str, dict]:
        """The named connections, decrypted, in promptflow's executor format (what
        ``DictConnectionProvider`` takes). Any missing (or another owner's) is an error."""
        return self._executor_format(names, owner=owner, shared=frozenset())

    def usable_names(self, owner: str, *, identity: str | None = None) -> set[str]:
        """The connection names a run of ``owner`` on a session of ``identity`` may use: the
        owner's own, plus those a managed identity gives access to (and that exist)."""
        q = select(connections.c.name).where(_usable(owner, self._shared(identity)))
        with self.store.engine.connect() as c:
            return set(c.execute(q).scalars())

    def for_executor_as(self, names: Iterable[str], *, owner: str,
                        identity: str | None = None) -> dict[str, dict]:
        """``for_executor`` for a run of ``owner`` on a session whose identity is
        ``identity``: a name resolves to the owner's connection, or (managed identity) to the
        connection of that name the identity gives access to, whoever owns it. ``None`` or
        ``"user"`` is the user's own identity: exactly ``for_executor``. A name that resolves
        to neither is an error (NotFound), as in ``for_executor``; intersect the candidates
        with ``usable_names`` first to drop names that are not connections."""
        return self._executor_format(names, owner=owner, shared=self._shared(identity))

    def _shared(self, identity: str | None) -> frozenset[str]:
        from flowsession.access.identities import allowed_connections

        return allowed_connections(self.store, identity)

    def _executor_format(self, names: Iterable[str], *, owner: str,
                         shared: frozenset[str]) -> dict[str, dict]:
        wanted = sorted(set(names))
        if not wanted:
            return {}
        with self.store.engine.connect() as c:
            rows = {r.name: r for r in c.execute(select(connections).where(
                connections.c.name.in_(wanted), _usable(owner, shared)))}
        if missing := [n for n in wanted if n not in rows]:
            raise _not_found(missing)
        out = {}
        for name in wanted:
            row = rows[name]
            kind = KINDS[row.type]
            configs, secrets = json.loads(row.configs), self._decrypt(row)
            value = {k: v for k, v in {**configs, **secrets}.items() if v is not None}
            out[name] = {"type": kind.class_name, "name": name, "module": "promptflow.connections",
                         "value": value, "secret_keys": list(secrets)}
        return out

    # --- helpers --------------------------------------------------------------------------

    def _row(self, name: str, owner: str):
        with self.store.engine.connect() as c:
            row = c.execute(select(connections).where(connections.c.name == name,
                                                      connections.c.owner == owner)).first()
        if row is None:
            raise _not_found([name])
        return row

    def _connection(self, row) -> Connection:
        return Connection(name=row.name, type=row.type, owner=row.owner,
                          configs=json.loads(row.configs), secret_keys=list(self._decrypt(row)),
                          created_at=row.created_at, updated_at=row.updated_at)

    def _cipher(self) -> Fernet:
        if self._fernet is None:
            self._fernet = cipher(self.settings)
        return self._fernet

    def _decrypt(self, row) -> dict[str, str]:
        from cryptography.fernet import InvalidToken

        try:
            return json.loads(self._cipher().decrypt(row.secrets))
        except InvalidToken:
            raise FlowSessionError(
                f"cannot decrypt the secrets of connection '{row.name}': the key file "
                f"{self.settings.secret_key_file} is not the one they were stored with",
                hint="restore that key file, or delete the connection and create it again",
            ) from None


def _usable(owner: str, shared: frozenset[str]):
    """The rows a run of ``owner`` may use: its own, and those shared through an identity."""
    own = connections.c.owner == owner
    return own | connections.c.name.in_(sorted(shared)) if shared else own


def _not_found(names: list[str]) -> NotFound:
    if len(names) == 1:
        return NotFound(f"connection '{names[0]}' does not exist",
                        hint=f"list yours with: flowsession connection list; {_CREATE_HINT}")
    return NotFound("connections " + ", ".join(f"'{n}'" for n in names) + " do not exist",
                    hint=f"list yours with: flowsession connection list; {_CREATE_HINT}")


# --- reading the YAML ------------------------------------------------------------------------


def _load_file(path: str | os.PathLike[str], name: str | None) -> tuple[Path, str, Any]:
    """A connection YAML file read and parsed: (file, its text, its data with ``name``)."""
    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidInput(f"{file}: the file does not exist",
                           hint="give the connection's YAML file, e.g. --file conn.yaml",
                           details={"file": str(file)}) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{file}: cannot read the file ({exc.__class__.__name__})",
                           hint="make sure the file is readable and saved as UTF-8",
                           details={"file": str(file)}) from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        # only the problem and its line: PyYAML's full message quotes the line's text,
        # which may hold a secret
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 1 if mark is not None else None
        what = getattr(exc, "problem", None) or getattr(exc, "context", None) or "invalid"
        raise InvalidInput(f"{file}{'' if line is None else f', line {line}'}: the YAML "
                           f"cannot be parsed: {what}",
                           hint="fix the YAML at that line: indentation, a missing ':' or "
                           "an unquoted special character are the usual causes",
                           details={"file": str(file), "line": line}) from None
    if data is None:
        data = {}
    if name is not None and not NAME_RE.match(name):
        raise InvalidInput(f"--name: {name!r} is not a valid connection name",
                           hint="use letters, digits, '_' and '-' only (at most 200)")
    if isinstance(data, Mapping) and name is not None:
        data = {**data, "name": name}
    return file, text, data


def read_connection_file(path: str | os.PathLike[str], *, name: str | None = None
                         ) -> dict[str, Any]:
    """A connection YAML file checked here (errors name the file, line and field) and
    returned as the API's body, each ``${env:VAR}`` read from this process's environment
    (the caller's, as prompt flow does): what a client sends to a server."""
    file, text, data = _load_file(path, name)
    parser = _Parser(str(file), text)
    parser.parse(data)

    def value(field: str, v: Any) -> Any:
        return parser._env(field, v) if isinstance(v, str) else v

    out: dict[str, Any] = {}
    for key, v in data.items():
        if key in ("configs", "secrets") and isinstance(v, Mapping):
            out[key] = {k: value(f"{key}.{k}", x) for k, x in v.items()}
        else:
            out[key] = value(str(key), v)
    return out


@dataclass
class _Spec:
    """A checked connection file: configs final, secrets as written (resolved on save)."""

    parser: _Parser
    name: str
    type: str
    configs: dict[str, str]
    raw_secrets: dict[str, str]  # field path -> value as written

    def resolve_secrets(self, existing: dict[str, str] | None) -> dict[str, str]:
        """``${env:VAR}`` read now; an empty, all-'*' or '<no-change>' value keeps the stored
        one when updating (as in prompt flow) and is an error otherwise."""
        out = {}
        for path, value in self.raw_secrets.items():
            key = path.split(".", 1)[1] if path.startswith("secrets.") else path
            if value == "" or value == _NO_CHANGE or set(value) == {"*"}:
                if existing is not None and existing.get(key):
                    out[key] = existing[key]
                    continue
                raise self.parser.error(
                    path, "no value (empty, masked or <no-change>)" if existing is None else
                    "no value, and the stored connection has none to keep",
                    hint="write the secret, or ${env:VARIABLE} to read it from the environment")
            out[key] = value
        return out


class _Parser:
    def __init__(self, source: str, text: str | None, *, allow_env: bool = True):
        self.source, self.text, self.allow_env = source, text, allow_env

    def error(self, field: str | None, message: str, *, hint: str = "",
              missing: bool = False) -> InvalidInput:
        """An error naming the file, the field and (unless it is missing) the field's line."""
        line = None
        if self.text is not None and field and not missing:
            from flowsession.flows.flowfile import locate_line

            try:
                line = locate_line(self.text, field)
            except yaml.YAMLError:
                line = None
        where = self.source or "the connection"
        if line is not None:
            where += f", line {line}"
        full = f"{where}: {message}" if field is None else f"{where}: field '{field}': {message}"
        return InvalidInput(full, hint=hint,
                            details={"file": self.source, "line": line, "field": field})

    def parse(self, data: Any) -> _Spec:
        if not isinstance(data, Mapping):
            raise self.error(None, "a connection file must be a YAML mapping (key: value lines)",
                             hint="see prompt flow's connection YAML: name, type, api_key, ...")
        name = data.get("name")
        if name in (None, ""):
            raise self.error("name", "missing", missing=True,
                             hint="add 'name: my_connection' (or give --name)")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise self.error("name", f"{name!r} is not a valid connection name",
                             hint="use letters, digits, '_' and '-' only (at most 200)")
        typ = data.get("type")
        supported = ", ".join(KINDS)
        if typ in (None, ""):
            raise self.error("type", "missing", missing=True,
                             hint=f"add 'type:' with one of: {supported}")
        kind = KINDS.get(_TYPE_ALIASES.get(str(typ).lower().replace("-", "_"), ""))
        if kind is None:
            raise self.error("type", f"'{typ}' is not a supported connection type (supported: "
                             f"{supported})", hint=f"write one of: {supported}")
        allowed = (*_COMMON_FIELDS, *kind.fields)
        for key in data:
            if key not in allowed:
                raise self.error(str(key), f"not a field of a {kind.type} connection",
                                 hint="the fields are: " + ", ".join(allowed))
        if kind.type == "custom":
            configs, secrets = self._custom(data)
        else:
            configs, secrets = self._typed(kind, data)
        return _Spec(self, name, kind.type, configs, secrets)

    def _typed(self, kind: _Kind, data: Mapping) -> tuple[dict[str, str], dict[str, str]]:
        secrets = {}
        for key in kind.secrets:
            value = self._secret(key, data.get(key))
            if value is None:
                raise self.error(key, "missing", missing=True,
                                 hint=f"add '{key}: ...' (or ${{env:VARIABLE}})")
            secrets[key] = value
        configs = {}
        for key in kind.required:
            value = self._config(key, data.get(key))
            if not value:
                raise self.error(key, "missing" if value is None else "is empty",
                                 missing=value is None, hint=f"add '{key}: ...'")
            configs[key] = value
        for key, default in kind.optional:
            value = self._config(key, data.get(key))
            if value:
                configs[key] = value
            elif default is not None:
                configs[key] = default
        return configs, secrets

    def _custom(self, data: Mapping) -> tuple[dict[str, str], dict[str, str]]:
        configs_in = data.get("configs") or {}
        if not isinstance(configs_in, Mapping):
            raise self.error("configs", "must be a mapping of names to values",
                             hint="write 'configs:' with indented 'key: value' lines")
        if "secrets" not in data:
            raise self.error("secrets", "missing",
                             hint="add 'secrets:' with indented 'key: value' lines")
        secrets_in = data.get("secrets") or {}
        if not isinstance(secrets_in, Mapping):
            raise self.error("secrets", "must be a mapping of names to values",
                             hint="write 'secrets:' with indented 'key: value' lines")
        configs, secrets = {}, {}
        for key, value in configs_in.items():
            self._key("configs", key)
            value = self._config(f"configs.{key}", value)
            configs[key] = "" if value is None else value
        for key, value in secrets_in.items():
            self._key("secrets", key)
            if key in configs:
                raise self.error(f"secrets.{key}", "is also under 'configs'",
                                 hint="a key is either a config or a secret: remove one")
            value = self._secret(f"secrets.{key}", value)
            secrets[f"secrets.{key}"] = "" if value is None else value
        return configs, secrets

    def _key(self, section: str, key: Any) -> None:
        if not isinstance(key, str) or not key:
            raise self.error(section, f"the key {key!r} is not a name",
                             hint="write each key as a name, e.g. 'endpoint: ...'")

    def _scalar(self, field: str, value: Any, *, secret: bool) -> str | None:
        if value is None:
            return None
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (str, int, float)):
            return str(value)
        # never quote a secret's value in a message
        shown = "a " + type(value).__name__.replace("dict", "mapping") if secret else repr(value)
        raise self.error(field, f"must be a single value, not {shown}",
                         hint="write it as a quoted string on the same line")

    def _env(self, field: str, value: str) -> str:
        m = _ENV_RE.match(value.strip())
        if not m:
            return value
        var = m.group(1)
        if not self.allow_env:
            raise self.error(field, f"${{env:{var}}} would read the server's environment",
                             hint="send the value itself")
        if var not in os.environ:
            raise self.error(field, f"the environment variable {var} is not set",
                             hint=f"set {var} before running the command, or write the value")
        if not os.environ[var]:
            raise self.error(field, f"the environment variable {var} is empty",
                             hint=f"give {var} a value before running the command")
        return os.environ[var]

    def _config(self, field: str, value: Any) -> str | None:
        value = self._scalar(field, value, secret=False)
        return None if value is None else self._env(field, value)

    def _secret(self, field: str, value: Any) -> str | None:
        value = self._scalar(field, value, secret=True)
        if value is None:
            return None
        if value.strip() in _PLACEHOLDERS:
            raise self.error(field, f"still holds the placeholder {value.strip()}",
                             hint="replace it with the secret, or ${env:VARIABLE} to read it "
                             "from the environment")
        return self._env(field, value)

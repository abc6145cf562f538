"""Opening the store: the engine, SQLite pragmas, and migrations to the newest schema."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, inspect, make_url, text
from sqlalchemy.exc import SQLAlchemyError

from flowsession.errors import StoreUnavailable

_MIGRATIONS = Path(__file__).with_name("migrations")


@dataclass(frozen=True)
class Store:
    engine: Engine

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def open_store(url: str, *, migrate: bool = True) -> Store:
    """Open (and bring up to date) the database at ``url``."""
    try:
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(url, connect_args={"timeout": 30})
            event.listen(engine, "connect", _sqlite_pragmas)
        else:
            engine = create_engine(url, pool_pre_ping=True)
        store = Store(engine)
        if migrate:
            upgrade(store)
    except (SQLAlchemyError, ImportError, OSError) as exc:
        shown = make_url(url).render_as_string(hide_password=True) if "://" in url else url
        raise StoreUnavailable(
            f"cannot open the database {shown}: {str(exc).splitlines()[0]}",
            hint="check FLOWSESSION_DATABASE_URL (e.g. postgresql+psycopg://host:5432/db, or "
            "unset it for SQLite in FLOWSESSION_HOME) and that the server is up",
        ) from exc
    return store


def _alembic_config():
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    return cfg


def head_revision() -> str:
    """The newest migration. Revisions are numbered in sequence ("0001", "0002", ...) and each
    file is named after its revision, so the head is the highest number (a test holds this)."""
    return max(p.name.split("_", 1)[0] for p in (_MIGRATIONS / "versions").glob("[0-9]*_*.py"))


def current_revision(store: Store) -> str | None:
    with store.engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def upgrade(store: Store) -> None:
    """Run Alembic migrations to head. When the schema is current (every start but the first
    after an upgrade), this is one query and Alembic is never imported."""
    if current_revision(store) == head_revision():
        return
    from alembic import command

    cfg = _alembic_config()
    with store.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def table_names(store: Store) -> list[str]:
    return sorted(inspect(store.engine).get_table_names())

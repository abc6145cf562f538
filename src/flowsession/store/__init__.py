"""Persistence: SQLAlchemy tables and Alembic migrations. SQLite by default, PostgreSQL by URL."""

from flowsession.store.db import Store, open_store

__all__ = ["Store", "open_store"]

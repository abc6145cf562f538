"""A fresh database on the local PostgreSQL server, for the tests that run on it."""

from __future__ import annotations

import contextlib
import os
import uuid

import pytest

POSTGRES_URL = os.environ.get("FLOWSESSION_TEST_POSTGRES",
                              "postgresql+psycopg://root@127.0.0.1:5432/test")


@contextlib.contextmanager
def new_postgres_database():
    """A fresh database on the local PostgreSQL server, dropped afterwards (skips when there
    is no server -- a failure when CI is set)."""
    try:
        import psycopg

        admin = psycopg.connect("host=127.0.0.1 port=5432 dbname=test user=root",
                                autocommit=True, connect_timeout=3)
    except Exception as exc:  # no server here: the SQLite runs still cover the logic
        pytest.skip(f"PostgreSQL on 127.0.0.1:5432 is not reachable: {exc}")
    name = f"flowsession_{uuid.uuid4().hex[:10]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()

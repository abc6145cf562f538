"""The store: migrations bring a new database to the newest schema, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory

from flowsession.store import open_store
from flowsession.store.db import _MIGRATIONS, current_revision, head_revision, table_names
from flowsession.store.tables import metadata


def test_the_quick_head_check_agrees_with_alembic():
    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    assert head_revision() == ScriptDirectory.from_config(cfg).get_current_head()


def test_a_new_sqlite_database_gets_every_table(tmp_path):
    store = open_store(f"sqlite:///{tmp_path}/x/fs.db")
    assert current_revision(store) == head_revision()
    assert set(metadata.tables) <= set(table_names(store))
    open_store(f"sqlite:///{tmp_path}/x/fs.db")  # opening again is a no-op


@pytest.mark.postgres
def test_a_new_postgresql_database_gets_every_table(postgres_url):
    store = open_store(postgres_url)
    assert current_revision(store) == head_revision()
    assert set(metadata.tables) <= set(table_names(store))

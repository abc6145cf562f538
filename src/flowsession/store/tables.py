"""The tables. Each service is the only writer of its own tables (named in the comments).

Times are UTC epoch seconds (floats): portable between SQLite and PostgreSQL and cheap to compare.
"""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

# --- environments service -----------------------------------------------------------------

images = Table(
    "images",
    metadata,
    Column("name", String(200), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("parent", String(220), nullable=True),  # "name:version" of the image it extends
    Column("builtin", Boolean, nullable=False, default=False),
    Column("description", Text, nullable=False, default=""),
    Column("requirements", Text, nullable=False, default=""),  # what was asked for
    Column("layer_lock", Text, nullable=False, default=""),  # what this image adds, pinned
    Column("state", String(20), nullable=False),  # DEFINED | BUILDING | READY | FAILED
    Column("python", String(400), nullable=True),  # base interpreter path, once built
    Column("python_version", String(40), nullable=True),
    Column("platform", String(100), nullable=True),
    Column("path", String(1000), nullable=True),
    Column("size_bytes", Integer, nullable=True),
    Column("error", Text, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("built_at", Float, nullable=True),
)

# A flow's requirements resolved against an image: the lock is fixed until the requirements,
# the image or the index change, so a cache hit needs no resolver and no network.
resolutions = Table(
    "resolutions",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("image", String(220), nullable=False),
    Column("lock", Text, nullable=False),
    Column("created_at", Float, nullable=False),
)

environments = Table(
    "environments",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("image", String(220), nullable=False),
    Column("lock", Text, nullable=False),  # the packages this environment adds to its image
    Column("python_version", String(40), nullable=False),
    Column("platform", String(100), nullable=False),
    Column("state", String(20), nullable=False),  # BUILDING | READY | FAILED
    Column("path", String(1000), nullable=False),
    Column("size_bytes", Integer, nullable=True),
    Column("error", Text, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("last_used_at", Float, nullable=False),
    Column("failed_at", Float, nullable=True),
)

environment_refs = Table(
    "environment_refs",
    metadata,
    Column(
        "env_id", String(64), ForeignKey("environments.id", ondelete="CASCADE"), primary_key=True
    ),
    Column("holder", String(200), primary_key=True),  # e.g. "session:<id>"
    Column("created_at", Float, nullable=False),
)

# --- access service -------------------------------------------------------------------------

feed_secrets = Table(
    "feed_secrets",
    metadata,
    Column("identity", String(200), primary_key=True),
    Column("host", String(400), primary_key=True),
    Column("ciphertext", LargeBinary, nullable=False),  # never the secret itself
    Column("created_at", Float, nullable=False),
)

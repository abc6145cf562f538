"""The tables. Each service is the only writer of its own tables (named in the comments).

Times are UTC epoch seconds (floats): portable between SQLite and PostgreSQL and cheap to compare.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    UniqueConstraint,
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

# --- computes service ---------------------------------------------------------------------

computes = Table(
    "computes",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("owner", String(200), nullable=False),
    Column("kind", String(20), nullable=False),  # serverless | instance
    Column("vm_size", String(100), nullable=False),
    Column("vcpu", Float, nullable=False),
    Column("memory_bytes", BigInteger, nullable=False),
    Column("state", String(20), nullable=False),  # RUNNING | STOPPED
    Column("idle_shutdown_s", Float, nullable=True),  # instances only
    Column("identity", String(200), nullable=False),
    Column("handle", Text, nullable=True),  # ComputeHandle JSON while RUNNING
    Column("reason", Text, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("last_activity_at", Float, nullable=False),
    UniqueConstraint("name", name="uq_computes_name"),
)

# --- sessions service ---------------------------------------------------------------------

sessions = Table(
    "sessions",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("flow", String(1000), nullable=False),
    Column("owner", String(200), nullable=False),
    Column("state", String(20), nullable=False),
    Column("compute_type", String(20), nullable=False),
    Column("compute_id", String(40), nullable=True),
    Column("vm_size", String(100), nullable=True),
    Column("image", String(220), nullable=True),
    Column("identity", String(200), nullable=False),
    Column("idle_timeout_s", Float, nullable=False),
    Column("env_id", String(64), nullable=True),
    Column("snapshot_id", String(64), nullable=True),
    Column("handle", Text, nullable=True),  # SessionHandle JSON while a supervisor runs
    # the control-plane process doing the session's pending work ("pid:start"): if it dies
    # mid-operation, the reconciler can tell that nobody is finishing it
    Column("operator", String(100), nullable=True),
    Column("reason", Text, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("last_activity_at", Float, nullable=False),
)

# One flow, one session: the row that exists while a session is bound to the flow.
flow_bindings = Table(
    "flow_bindings",
    metadata,
    Column("flow", String(1000), primary_key=True),
    Column("session_id", String(40), nullable=False),
)

session_events = Table(
    "session_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("session_id", String(40), nullable=False, index=True),
    Column("at", Float, nullable=False),
    Column("actor", String(200), nullable=False),
    Column("from_state", String(20), nullable=True),
    Column("to_state", String(20), nullable=False),
    Column("reason", Text, nullable=False, default=""),
)

# Supervisors started in advance with the runtime imported, waiting to be adopted.
standby = Table(
    "standby",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("image", String(220), nullable=False),
    Column("state", String(20), nullable=False),  # WARMING | READY | CLAIMED
    Column("handle", Text, nullable=False),
    Column("created_at", Float, nullable=False),
)

# --- runs service ---------------------------------------------------------------------------

# A batch run. Its lines live in files under ``<home>/runs/<name>/`` (inputs, results, outputs);
# this row is its record and summary.
runs = Table(
    "runs",
    metadata,
    Column("name", String(200), primary_key=True),
    Column("owner", String(200), nullable=False, index=True),
    Column("flow", String(1000), nullable=False),  # the flow's folder
    Column("display_name", String(400), nullable=False, default=""),
    Column("description", Text, nullable=False, default=""),
    Column("tags", Text, nullable=False, default="{}"),  # JSON object
    # Preparing | Running | Completed | Failed | Canceling | Canceled
    Column("status", String(20), nullable=False),
    Column("spec", Text, nullable=False),  # JSON: data, column_mapping, run, variant, ... (no secrets)
    Column("session_id", String(40), nullable=True),  # the session it runs (or ran) on
    Column("total", Integer, nullable=False, default=0),
    Column("completed", Integer, nullable=False, default=0),
    Column("failed", Integer, nullable=False, default=0),
    Column("errors", Text, nullable=False, default="[]"),  # JSON: the first line errors
    Column("error", Text, nullable=True),  # why the run itself failed
    Column("operator", String(100), nullable=True),  # "pid:start" of the process driving it
    Column("created_at", Float, nullable=False),
    Column("started_at", Float, nullable=True),
    Column("ended_at", Float, nullable=True),
)

# --- access: connections --------------------------------------------------------------------

# prompt flow connections (OpenAI, Azure OpenAI, custom): configs in clear, secrets encrypted
# with the same key as the feed secrets. The only writer is ``access.connections``.
connections = Table(
    "connections",
    metadata,
    Column("name", String(200), primary_key=True),
    Column("owner", String(200), nullable=False),
    Column("type", String(40), nullable=False),  # open_ai | azure_open_ai | custom
    Column("configs", Text, nullable=False, default="{}"),  # JSON object, no secrets
    Column("secrets", LargeBinary, nullable=False),  # Fernet token of a JSON object
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

# --- access: users, tokens, roles, identities, audit (the server) --------------------------

users = Table(
    "users",
    metadata,
    Column("name", String(200), primary_key=True),
    Column("display_name", String(400), nullable=False, default=""),
    Column("disabled", Boolean, nullable=False, default=False),
    Column("created_at", Float, nullable=False),
)

# API tokens: "fs_<id>_<secret>"; only a SHA-256 of the secret is kept.
api_tokens = Table(
    "api_tokens",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("user", String(200), nullable=False, index=True),
    Column("label", String(200), nullable=False, default=""),
    Column("secret_hash", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("last_used_at", Float, nullable=True),
    Column("revoked_at", Float, nullable=True),
)

# Roles are sets of scopes; the built-in ones (Owner, Data Scientist, Reader) are rows too.
roles = Table(
    "roles",
    metadata,
    Column("name", String(200), primary_key=True),
    Column("description", Text, nullable=False, default=""),
    Column("scopes", Text, nullable=False),  # JSON list
    Column("builtin", Boolean, nullable=False, default=False),
    Column("created_at", Float, nullable=False),
)

role_assignments = Table(
    "role_assignments",
    metadata,
    Column("user", String(200), primary_key=True),
    Column("role", String(200), primary_key=True),
    Column("assigned_by", String(200), nullable=False),
    Column("created_at", Float, nullable=False),
)

# Managed identities: workspace-level credentials (feed secrets live in feed_secrets under the
# identity's name; the connections it may use are listed here).
identities = Table(
    "identities",
    metadata,
    Column("name", String(200), primary_key=True),
    Column("description", Text, nullable=False, default=""),
    Column("connections", Text, nullable=False, default="[]"),  # JSON list of names
    Column("created_by", String(200), nullable=False),
    Column("created_at", Float, nullable=False),
)

audit_log = Table(
    "audit_log",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False, index=True),
    Column("actor", String(200), nullable=False),
    Column("action", String(200), nullable=False),  # "POST /api/sessions/{flow}/stop"
    Column("resource", String(1000), nullable=False, default=""),
    Column("status", Integer, nullable=False),  # the HTTP status answered
    Column("result", String(40), nullable=False),  # ok | denied | not_found | error code
    Column("detail", Text, nullable=False, default=""),
)

# Long operations (image builds, starts, installs, runs): polled by id, streamed by SSE.
operations = Table(
    "operations",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("kind", String(100), nullable=False),
    Column("resource", String(1000), nullable=False, default=""),
    Column("owner", String(200), nullable=False, index=True),
    Column("status", String(20), nullable=False),  # running | succeeded | failed
    Column("result", Text, nullable=True),  # JSON
    Column("error", Text, nullable=True),  # JSON: the error's to_dict()
    Column("server", String(100), nullable=False, default=""),  # "pid:start" running it
    Column("created_at", Float, nullable=False),
    Column("ended_at", Float, nullable=True),
)

# Flows registered on the server by name, per owner (uploaded into the home, or a path on the
# server's machine).
flows = Table(
    "flows",
    metadata,
    Column("owner", String(200), primary_key=True),
    Column("name", String(200), primary_key=True),
    Column("path", String(1000), nullable=False),
    Column("uploaded", Boolean, nullable=False, default=False),
    Column("created_at", Float, nullable=False),
)

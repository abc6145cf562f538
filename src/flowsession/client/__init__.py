"""The Python SDK: ``flowsession.Client``, in prompt flow's words (``pf.run``, ``get_details``,
``get_metrics``, ``stream``) plus sessions.

One client, two transports behind the same methods:

* a server (``flowsession server``), by URL and token: ``Client(url=..., token=...)``, or
  ``FLOWSESSION_URL`` + ``FLOWSESSION_TOKEN``, or ``FLOWSESSION_HOME/client.json`` (written by
  the server on its first start);
* otherwise in-process, the services called directly against the local store (the CLI's
  control plane), as ``Client(settings)`` always does.

Over HTTP a flow is a registered name (``register_flow``), or a local folder, uploaded on first
use under its folder name; a local data file is read here and sent inline.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowsession.config import Settings
from flowsession.errors import InvalidInput
from flowsession.runs.records import Run
from flowsession.runs.spec import RunSpec, spec_from_dict

if TYPE_CHECKING:
    from flowsession.sessions.records import Session

Progress = Callable[[dict[str, Any]], None] | None

__all__ = ["AuthenticationError", "Client", "PermissionDenied", "ServerUnreachable",
           "server_config"]


def __getattr__(name: str):
    if name in ("AuthenticationError", "PermissionDenied", "ServerUnreachable"):
        from flowsession.client import http

        return getattr(http, name)
    raise AttributeError(name)


def server_config(url: str | None = None, token: str | None = None,
                  environ: Mapping[str, str] | None = None) -> tuple[str | None, str | None]:
    """The server to speak to and the token: the arguments, else ``FLOWSESSION_URL`` /
    ``FLOWSESSION_TOKEN``, else ``FLOWSESSION_HOME/client.json``; ``(None, None)``: none."""
    env = os.environ if environ is None else environ
    url = url or env.get("FLOWSESSION_URL") or None
    token = token or env.get("FLOWSESSION_TOKEN") or None
    saved: dict[str, Any] = {}
    path = Settings.from_env(dict(env)).home / "client.json"
    if (url is None or token is None) and path.is_file():
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise InvalidInput(f"{path} cannot be read: {exc}",
                               hint="fix or delete it (flowsession server writes it)",
                               details={"file": str(path)}) from None
    if url is None:
        url = saved.get("url")
        token = token or saved.get("token")
    elif token is None and saved.get("url", "").rstrip("/") == url.rstrip("/"):
        token = saved.get("token")
    return url, token


class Client:
    """``Client()`` speaks to the configured server (see ``server_config``), or else uses the
    local flowsession home (``FLOWSESSION_HOME``) as the CLI does. ``Client(settings)`` is
    always in-process; ``Client(url=..., token=...)`` always a server."""

    def __init__(self, settings: Settings | None = None, *, user: str | None = None,
                 url: str | None = None, token: str | None = None, timeout: float = 30.0,
                 flows_by_path: bool = False):
        """``flows_by_path``: on a server that sees this machine's files (a local one), a flow
        folder is registered by its path (the server reads the folder itself, edits apply at
        once) instead of uploaded; this needs all:manage, and without it folders are
        uploaded as usual."""
        url, token = (url, token) if settings is not None and url is None else \
            server_config(url, token)
        if url:
            from flowsession.client.http import HttpTransport

            if not token:
                raise InvalidInput(f"no token for the flowsession server at {url}",
                                   hint="pass token=, or set FLOWSESSION_TOKEN (an Owner "
                                        "issues them: POST /api/users, /api/tokens)")
            if user is not None:
                raise InvalidInput("user= is for the in-process client: on a server, the "
                                   "token says who you are")
            self._t = HttpTransport(url, token, timeout=timeout, flows_by_path=flows_by_path)
            self.settings = None
            self.url: str | None = self._t.url
            self._user = None
        else:
            from flowsession.client.local import LocalTransport

            self._t = LocalTransport(settings, user=user)
            self.settings = self._t.settings
            self.url = None
            self._user = self._t.user

    @property
    def transport(self) -> str:
        """``"http"`` or ``"local"``."""
        return self._t.kind

    @property
    def user(self) -> str:
        if self._user is None:
            self._user = self._t.me()["user"]
        return self._user

    def close(self) -> None:
        self._t.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client(url={self.url!r})" if self.url else f"Client(home={self.settings.home})"

    # --- runs ------------------------------------------------------------------------------

    def run(self, flow: str | Path | None = None, data: str | Path | None = None, *,
            column_mapping: Mapping[str, Any] | None = None, run: str | Run | None = None,
            variant: str | None = None, resources: Mapping[str, Any] | None = None,
            identity: str | None = None,
            environment_variables: Mapping[str, str] | None = None,
            connections: Mapping[str, Mapping[str, str]] | None = None,
            name: str | None = None, display_name: str | None = None,
            description: str | None = None, tags: Mapping[str, str] | None = None,
            init: Mapping[str, Any] | None = None, workers: int | None = None,
            line_timeout: float | None = None, skip_malformed: bool = False,
            resume_from: str | Run | None = None, wait: bool = True,
            on_progress: Callable[[Run], None] | None = None, **extra: Any) -> Run:
        """Create a run (prompt flow's ``pf.run``) and, unless ``wait=False``, wait for it to
        end. Unknown keyword arguments are refused, naming them.

        ``flow``: a flow folder, or (on a server, or registered locally) a flow's name.
        ``data``: a local data file (.jsonl, .json, .csv, .tsv); on a server, a path that is
        not a local file names a file of the flow's folder there."""
        if extra:
            raise TypeError(f"run() got unexpected argument(s): {', '.join(sorted(extra))}")
        fields: dict[str, Any] = {
            "flow": self._t.flow_arg(flow), "data": self._t.data_arg(data),
            "column_mapping": column_mapping,
            "run": _name(run), "variant": variant, "resources": resources,
            "identity": identity, "environment_variables": environment_variables,
            "connections": connections, "name": name, "display_name": display_name,
            "description": description, "tags": tags, "init": init, "workers": workers,
            "line_timeout": line_timeout, "skip_malformed": skip_malformed or None,
            "resume_from": _name(resume_from)}
        spec, _ = spec_from_dict({k: v for k, v in fields.items() if v is not None},
                                 source="Client.run")
        return self.submit(spec, wait=wait, on_progress=on_progress)

    def submit(self, spec: RunSpec, *, wait: bool = True,
               on_progress: Callable[[Run], None] | None = None) -> Run:
        return self._t.submit(spec, wait=wait, on_progress=on_progress)

    def stream(self, run: str | Run, *, on_progress: Callable[[Run], None] | None = None,
               timeout: float | None = None) -> Run:
        """Wait for the run to end (or ``timeout`` seconds: the run as it is then), calling
        ``on_progress(run)`` as lines complete."""
        return self._t.stream(_name(run), on_progress=on_progress, timeout=timeout)

    def get_run(self, run: str | Run) -> Run:
        return self._t.get_run(_name(run))

    def list_runs(self, max_results: int | None = 50) -> list[Run]:
        return self._t.list_runs(max_results)

    def get_details(self, run: str | Run, *, all_results: bool = True,
                    max_results: int = 100) -> list[dict[str, Any]]:
        """Per line: ``line_number``, ``status``, ``inputs``, ``outputs``, ``error``."""
        rows = self._t.get_details(_name(run))
        return rows if all_results else rows[:max_results]

    def get_outputs(self, run: str | Run) -> list[dict[str, Any]]:
        """The completed lines' outputs (``outputs.jsonl``), each with its ``line_number``."""
        return self._t.get_outputs(_name(run))

    def get_metrics(self, run: str | Run) -> dict[str, Any]:
        return self._t.get_metrics(_name(run))

    def run_path(self, run: str | Run) -> str | None:
        """Where the run's files are (outputs.jsonl, metrics.json, logs), on the server's
        machine."""
        return self._t.run_path(_name(run))

    def get_logs(self, run: str | Run) -> list[dict[str, str]]:
        """The run's log, then its workers' logs: ``[{"name", "text"}]``."""
        return self._t.get_logs(_name(run))

    def cancel(self, run: str | Run) -> Run:
        return self._t.cancel(_name(run))

    # --- sessions --------------------------------------------------------------------------

    def test(self, flow: str | Path, inputs: Mapping[str, Any] | None = None,
             *, timeout: float = 600, init: Mapping[str, Any] | None = None
             ) -> dict[str, Any]:
        """One line on the flow's session (started if none runs): its outputs. ``init``: a
        flex flow class's ``__init__`` arguments."""
        return self._t.test(flow, dict(inputs or {}), timeout, dict(init or {}))

    def start_session(self, flow: str | Path, *, on_progress: Progress = None,
                      **options: Any) -> Session:
        """Start the flow's session; options: compute_type, vm_size, instance,
        idle_timeout_s (or idle_time='30m'), identity, image. ``on_progress(event)`` is called
        with the operation's progress events (``{"event": "progress", "message": ...}``)."""
        return self._t.start_session(flow, options, on_progress=on_progress)

    def get_session(self, flow: str | Path) -> Session:
        return self._t.get_session(flow)

    def list_sessions(self, *, all: bool = False) -> list[Session]:
        """Your sessions (every user's if you manage everything); ``all``: stopped ones too."""
        return self._t.list_sessions(all)

    def session_events(self, flow: str | Path) -> list[dict[str, Any]]:
        """The state changes of the flow's sessions: ``session_id``, ``at``, ``actor``,
        ``from_state``, ``to_state``, ``reason``."""
        return self._t.session_events(flow)

    def session_packages(self, flow: str | Path) -> list[dict[str, Any]]:
        """The running session's packages: ``name``, ``version``, ``origin``."""
        return self._t.session_packages(flow)

    def stop_session(self, flow: str | Path) -> Session:
        return self._t.stop_session(flow)

    def install(self, flow: str | Path, *, on_progress: Progress = None) -> Session:
        """Save and install: the flow's requirements into a new environment for its running
        session, switched to only when it works. Returns the session."""
        return self._t.install(flow, on_progress=on_progress)

    def reset_session(self, flow: str | Path, *, on_progress: Progress = None) -> Session:
        """Delete and recreate the session with the same settings."""
        return self._t.reset_session(flow, on_progress=on_progress)

    def update_session(self, flow: str | Path, *, idle_time: str | None = None,
                       vm_size: str | None = None, instance: str | None = None,
                       identity: str | None = None) -> Session:
        """Change the session's settings: ``idle_time`` and ``identity`` in place;
        ``vm_size`` or ``instance`` reset it onto the new compute."""
        return self._t.update_session(flow, {"idle_time": idle_time, "vm_size": vm_size,
                                             "instance": instance, "identity": identity})

    # --- sessions by id: whatever became of the flow's folder -------------------------------

    def get_session_by_id(self, session_id: str) -> Session:
        """The session ``session_id`` (``ses-...``): yours, or anyone's if you manage
        everything; ``flow_missing`` says whether its flow's folder is gone."""
        return self._t.get_session_by_id(session_id)

    def session_events_by_id(self, session_id: str) -> list[dict[str, Any]]:
        """The session's own state changes (``session_events`` has the flow's every session)."""
        return self._t.session_events_by_id(session_id)

    def session_packages_by_id(self, session_id: str) -> list[dict[str, Any]]:
        return self._t.session_packages_by_id(session_id)

    def session_logs(self, session_id: str, *, tail_bytes: int = 64 * 1024) -> str:
        """The end of the session's supervisor and worker log (at most ``tail_bytes``)."""
        return self._t.session_logs(session_id, tail_bytes=tail_bytes)

    def stop_session_by_id(self, session_id: str) -> Session:
        """Stop the session and release its compute; never needs the flow's folder."""
        return self._t.stop_session_by_id(session_id)

    def reset_session_by_id(self, session_id: str, *, on_progress: Progress = None) -> Session:
        """Reset the session (its flow's folder must still be there)."""
        return self._t.reset_session_by_id(session_id, on_progress=on_progress)

    def install_by_id(self, session_id: str, *, on_progress: Progress = None) -> Session:
        """Save and install what the session's flow folder's requirements now say."""
        return self._t.install_by_id(session_id, on_progress=on_progress)

    def update_session_by_id(self, session_id: str, *, idle_time: str | None = None,
                             vm_size: str | None = None, instance: str | None = None,
                             identity: str | None = None) -> Session:
        return self._t.update_session_by_id(session_id, {
            "idle_time": idle_time, "vm_size": vm_size, "instance": instance,
            "identity": identity})

    # --- flows -----------------------------------------------------------------------------

    def get_flow(self, name: str) -> dict[str, Any]:
        """A registered flow: ``name``, ``owner``, ``path``, ``uploaded``."""
        return self._t.get_flow(name)

    def register_flow(self, name: str, path: str | Path, *,
                      on_server: bool = False) -> dict[str, Any]:
        """Register the flow folder ``path`` as ``name``: uploaded (its text files), or with
        ``on_server=True`` a folder of the server's machine (needs all:manage)."""
        return self._t.register_flow(name, path, on_server=on_server)

    def read_flow_file(self, flow: str | Path, path: str) -> str:
        return self._t.read_flow_file(flow, path)

    def write_flow_file(self, flow: str | Path, path: str, content: str) -> None:
        """Save only: a running session is not touched (``install`` applies a changed
        requirements.txt; other files take effect at the next line)."""
        self._t.write_flow_file(flow, path, content)

    # --- computes --------------------------------------------------------------------------

    def list_computes(self) -> list[dict[str, Any]]:
        return self._t.list_computes()

    def create_compute(self, name: str, *, size: str | None = None,
                       idle_shutdown: str | None = None) -> dict[str, Any]:
        """A compute instance of yours (``size``: a VM size; ``idle_shutdown``: e.g. '2h')."""
        return self._t.create_compute(name, size=size, idle_shutdown=idle_shutdown)

    def get_compute(self, name: str) -> dict[str, Any]:
        """One compute, with ``sessions``: how many sessions it hosts."""
        return self._t.get_compute(name)

    def start_compute(self, name: str) -> dict[str, Any]:
        return self._t.start_compute(name)

    def stop_compute(self, name: str) -> dict[str, Any]:
        """Stop a compute instance; the sessions on it stop."""
        return self._t.stop_compute(name)

    def delete_compute(self, name: str) -> dict[str, Any]:
        return self._t.delete_compute(name)

    def compute_sizes(self) -> dict[str, Any]:
        """``sizes`` (name, vcpu, memory_bytes, description), ``vcpu_quota``, ``vcpu_in_use``."""
        return self._t.compute_sizes()

    # --- images and environments -----------------------------------------------------------

    def list_images(self) -> list[dict[str, Any]]:
        return self._t.list_images()

    def get_image(self, ref: str) -> dict[str, Any]:
        """``NAME`` (the newest version) or ``NAME:VERSION``, with ``installed`` packages."""
        return self._t.get_image(ref)

    def build_image(self, ref: str, *, on_progress: Progress = None) -> dict[str, Any]:
        return self._t.build_image(ref, on_progress=on_progress)

    def create_image(self, name: str, *, requirements: str | Path,
                     base: str = "flowsession/runtime", description: str = "",
                     identity: str | None = None,
                     on_progress: Progress = None) -> dict[str, Any]:
        """A custom image: ``base`` plus the packages of the requirements file
        ``requirements``."""
        return self._t.create_image(name, requirements=requirements, base=base,
                                    description=description, identity=identity,
                                    on_progress=on_progress)

    def check_image(self, ref: str) -> dict[str, Any]:
        """Does image ``ref`` have a newer version: ``current_version``, ``newest_version``,
        ``newer_available``, ``pinned``."""
        return self._t.check_image(ref)

    def build_environment(self, flow: str | Path, *, refresh: bool = False,
                          identity: str | None = None,
                          on_progress: Progress = None) -> dict[str, Any]:
        """Build (or find) the flow's environment; ``refresh`` resolves the requirements
        again."""
        return self._t.build_environment(flow, refresh=refresh, identity=identity,
                                         on_progress=on_progress)

    def list_environments(self) -> list[dict[str, Any]]:
        return self._t.list_environments()

    def get_environment(self, env_id: str) -> dict[str, Any]:
        return self._t.get_environment(env_id)

    def environment_packages(self, env_id: str) -> list[dict[str, Any]]:
        return self._t.environment_packages(env_id)

    def remove_environment(self, env_id: str) -> dict[str, Any]:
        return self._t.remove_environment(env_id)

    # --- connections, feed secrets, managed identities -------------------------------------

    def create_connection(self, file: str | Path, *, name: str | None = None
                          ) -> dict[str, Any]:
        """Create (or update yours of the same name) from prompt flow's connection YAML;
        ``${env:VAR}`` is read from this process's environment. The answer has ``created``."""
        return self._t.create_connection(file, name=name)

    def list_connections(self) -> list[dict[str, Any]]:
        return self._t.list_connections()

    def get_connection(self, name: str) -> dict[str, Any]:
        return self._t.get_connection(name)

    def delete_connection(self, name: str) -> dict[str, Any]:
        return self._t.delete_connection(name)

    def set_feed_secret(self, host: str, secret: str, *,
                        identity: str | None = None) -> dict[str, Any]:
        """The secret that fills ``{private}`` in feeds on ``host``: the ``user`` identity's
        (no ``identity``), or a managed identity's."""
        return self._t.set_feed_secret(host, secret, identity=identity)

    def list_feed_secrets(self, *, identity: str | None = None) -> list[dict[str, Any]]:
        """``identity``, ``host``, ``secret`` (masked), ``created_at``."""
        return self._t.list_feed_secrets(identity=identity)

    def delete_feed_secret(self, host: str, *, identity: str | None = None) -> dict[str, Any]:
        return self._t.delete_feed_secret(host, identity=identity)

    def list_identities(self) -> list[dict[str, Any]]:
        return self._t.list_identities()

    def get_identity(self, name: str) -> dict[str, Any]:
        return self._t.get_identity(name)

    def create_identity(self, name: str, *, description: str = "",
                        connections: Iterable[str] = ()) -> dict[str, Any]:
        return self._t.create_identity(name, description=description,
                                       connections=connections)

    def delete_identity(self, name: str) -> dict[str, Any]:
        return self._t.delete_identity(name)

    def set_identity_connections(self, name: str, connections: Iterable[str]
                                 ) -> dict[str, Any]:
        return self._t.set_identity_connections(name, connections)

    # --- who am I; users, tokens, roles, the audit log -------------------------------------

    def me(self) -> dict[str, Any]:
        """``user``, ``roles``, ``scopes``."""
        return self._t.me()

    def list_users(self) -> list[dict[str, Any]]:
        return self._t.list_users()

    def create_user(self, name: str, *, roles: Iterable[str] = (),
                    display_name: str = "") -> dict[str, Any]:
        """A user with roles and a first ``token`` (in this answer only)."""
        return self._t.create_user(name, roles=roles, display_name=display_name)

    def disable_user(self, name: str) -> dict[str, Any]:
        return self._t.disable_user(name)

    def list_tokens(self) -> list[dict[str, Any]]:
        """Your tokens (every user's with users:read); never their secrets."""
        return self._t.list_tokens()

    def create_token(self, *, label: str = "") -> dict[str, Any]:
        """A new token for yourself: ``token`` (in this answer only), ``id``, ``label``."""
        return self._t.create_token(label=label)

    def revoke_token(self, token_id: str) -> dict[str, Any]:
        return self._t.revoke_token(token_id)

    def list_roles(self) -> list[dict[str, Any]]:
        return self._t.list_roles()

    def create_role(self, name: str, scopes: Iterable[str], *,
                    description: str = "") -> dict[str, Any]:
        return self._t.create_role(name, scopes, description=description)

    def delete_role(self, name: str) -> dict[str, Any]:
        return self._t.delete_role(name)

    def assign_role(self, user: str, role: str) -> dict[str, Any]:
        return self._t.assign_role(user, role)

    def unassign_role(self, user: str, role: str) -> dict[str, Any]:
        return self._t.unassign_role(user, role)

    def audit(self, *, limit: int = 200, actor: str | None = None) -> list[dict[str, Any]]:
        """Who did what to which resource, when, with what result: newest first."""
        return self._t.audit(limit=limit, actor=actor)


def _name(run: str | Run | None) -> str | None:
    return run.name if isinstance(run, Run) else run

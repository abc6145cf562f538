"""``flowsession server``: the REST API (OpenAPI at /docs), the reconciler and the idle
culler, in one process; ``server start | stop | status`` for the local server of this home.

The local server of a home (``FLOWSESSION_HOME``) is the one the CLI and the SDK speak to when
no ``FLOWSESSION_URL`` is set: they start it when none runs (``client/local_server.py``). Whoever
starts it, a server writes its identity to ``FLOWSESSION_HOME/server.pid`` and its URL and a
token of its administrator to ``FLOWSESSION_HOME/client.json`` (mode 0600). The token is made
when the server's first user is: a restarted server keeps the token of the file and writes its
new URL beside it. An orderly stop (``server stop``, SIGTERM, Ctrl-C) stops the server's
sessions too, and writes what it stopped to ``FLOWSESSION_HOME/server.stopped.json`` for
``server stop`` to tell; a crash leaves them to the next server, which takes them up."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import typer

from flowsession.cli.output import emit_json, err, fields, handle_errors, out
from flowsession.client.local_server import (
    client_config_path,
    pid_path,
    read_client_config,
    read_stopped,
    running_pid,
    server_log,
    stopped_path,
)
from flowsession.errors import Conflict

app = typer.Typer()
STOP_TIMEOUT_S = 60.0  # SIGTERM, then SIGKILL: the sessions stop first


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600 from the first byte, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _client_url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


def _client_token(svc, settings, new_token: str | None) -> tuple[str, str] | None:
    """(token, user) for client.json: a new administrator's; else the file's own while it is
    still valid; else (the file lost, or its token revoked) a new one for this home's user if
    that user exists here. None: no token to give (the file is left as it is)."""
    if new_token is not None:
        return new_token, settings.user
    saved = read_client_config(settings).get("token")
    who = svc.accounts.authenticate(saved) if saved else None
    exists = settings.user in {u["name"] for u in svc.accounts.list_users()
                               if not u["disabled"]}
    if who is not None and (who.user == settings.user or not exists):
        return saved, who.user
    if exists:
        token, _ = svc.accounts.issue_token(settings.user, label="local cli")
        return token, settings.user
    return None


@app.callback(invoke_without_command=True)
@handle_errors
def server(
    ctx: typer.Context,
    host: str = typer.Option("127.0.0.1", "--host", help="The address to listen on."),
    port: int = typer.Option(8765, "--port", help="The port to listen on."),
    register: list[Path] = typer.Option(None, "--register", help="Register this flow folder "
                                        "(by its folder name) for the administrator; "
                                        "repeatable."),
    log_level: str = typer.Option("info", "--log-level"),
    show_token: bool = typer.Option(False, "--show-token", help="Print the administrator's "
                                    "token (kept in client.json) even when it is not new."),
    keep_sessions: bool = typer.Option(False, "--keep-sessions", help="On stop, leave the "
                                       "sessions running for the next server to take up (a "
                                       "server restarted for an upgrade); by default an "
                                       "orderly stop stops them."),
) -> None:
    """Serve the API. On a new server the first user (you) becomes Owner; their token is kept
    in FLOWSESSION_HOME/client.json for the CLI and the SDK (and printed once, on a terminal)."""
    if ctx.invoked_subcommand is not None:
        return
    import uvicorn

    from flowsession.api.app import bootstrap_admin, create_app
    from flowsession.backends.compute import procs
    from flowsession.config import Settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    settings = Settings.from_env()
    other = running_pid(settings)
    if other is not None and other != os.getpid():
        saved = read_client_config(settings).get("url", "")
        raise Conflict(f"a flowsession server already runs for {settings.home} (pid {other}"
                       + (f", {saved}" if saved else "") + ")",
                       hint="use it, or stop it first: flowsession server stop")
    pidfile = pid_path(settings)
    me = procs.identity()

    def stopped(what: dict) -> None:  # for `server stop` to tell (it waits for this process)
        write_private(stopped_path(settings), json.dumps({"server": me, **what}))

    app_ = create_app(settings, keep_sessions=keep_sessions, on_stopped=stopped)
    svc = app_.state.services
    new_token = bootstrap_admin(svc, None)
    url = _client_url(host, port)
    config = client_config_path(settings)
    kept = _client_token(svc, settings, new_token)
    saved = read_client_config(settings)
    write_private(config, json.dumps({  # the URL always; a token when there is one to keep
        "url": url, "token": kept[0] if kept else saved.get("token"),
        "user": kept[1] if kept else saved.get("user")}))
    write_private(pidfile, me + "\n")
    for folder in register or []:
        name = folder.resolve().name
        try:
            svc.extra["flows"].register(name, owner=settings.user, path=str(folder.resolve()))
            err.print(f"registered flow {name} ({folder})", highlight=False)
        except Conflict:
            pass
    out.print(f"[bold]flowsession server[/] at {url}  (API docs: {url}/docs)", highlight=False,
              soft_wrap=True)
    if new_token is not None and sys.stdout.isatty():  # never into a log file
        out.print(f"administrator [bold]{settings.user}[/] token (shown once; kept in "
                  f"{config}):\n  {new_token}", highlight=False)
    elif kept is not None and show_token:  # asked for, on the command line: make run does
        out.print(f"token of [bold]{kept[1]}[/] (kept in {config}):\n  {kept[0]}",
                  highlight=False, soft_wrap=True)
    elif kept is not None:
        out.print(f"the token of {kept[1]} is in {config}", highlight=False, soft_wrap=True)
    try:
        uvicorn.run(app_, host=host, port=port, log_level=log_level,
                    timeout_graceful_shutdown=5)
    finally:  # (uvicorn re-raises a SIGTERM once it has shut down: then this never runs)
        with contextlib.suppress(OSError):
            if pidfile.read_text().strip() == me:
                pidfile.unlink()


@app.command()
@handle_errors
def start(port: int = typer.Option(None, "--port", help="The port (default: a free one)."),
          json: bool = typer.Option(False, "--json", help="Print machine-readable JSON.")
          ) -> None:
    """Start this home's local server in the background (the CLI also does it by itself when
    none runs). It serves 127.0.0.1 only; its log is FLOWSESSION_HOME/logs/server.log."""
    from flowsession.cli.connect import ensure_local_server
    from flowsession.config import Settings

    settings = Settings.from_env()
    local = ensure_local_server(settings, port=port)
    data = {"running": True, "url": local.url, "pid": running_pid(settings),
            "started": local.started, "log": str(local.log)}
    if json:
        return emit_json(data)
    out.print(("started" if local.started else "already running:")
              + f" flowsession server at {local.url} (pid {data['pid']})", highlight=False)


@app.command()
@handle_errors
def stop(json: bool = typer.Option(False, "--json", help="Print machine-readable JSON.")
         ) -> None:
    """Stop this home's local server and its sessions (each stopped gracefully, its record
    saying why). A run in flight goes on when the server starts again (the next command
    starts it)."""
    from flowsession.config import Settings

    settings = Settings.from_env()
    with err.status("stopping the flowsession server and its sessions ..."):
        stopped = stop_local_server(settings)
    if json:
        return emit_json({"stopped": stopped is not None,
                          **(stopped.to_dict() if stopped else {"pid": None})})
    if stopped is None:
        out.print(f"no flowsession server runs for {settings.home}", highlight=False)
        return
    if stopped.sessions is None:  # it said nothing: killed, or it kept its sessions
        out.print(f"stopped the flowsession server (pid {stopped.pid})"
                  + ("; it did not stop in time and was killed: its sessions may still run "
                     "(the next server takes them up)" if stopped.killed else ""),
                  highlight=False)
        return
    n = len(stopped.sessions)
    out.print(f"stopped the flowsession server (pid {stopped.pid}) and its {n} session(s)"
              if n else f"stopped the flowsession server (pid {stopped.pid}); it ran no "
              "session", highlight=False)
    if stopped.runs:
        out.print(f"{len(stopped.runs)} run(s) in flight ({', '.join(stopped.runs)}) go on "
                  "when the server starts again (flowsession run cancel NAME ends one)",
                  highlight=False, markup=False)


@dataclass(frozen=True)
class Stopped:
    """A stopped local server: its pid, the sessions it stopped with itself and the runs
    still in flight (None: it did not say: killed, or it kept its sessions)."""

    pid: int
    killed: bool
    sessions: list[str] | None
    runs: list[str] | None

    def to_dict(self) -> dict:
        return {"pid": self.pid, "killed": self.killed, "sessions": self.sessions,
                "runs": self.runs}


def stop_local_server(settings, timeout: float = STOP_TIMEOUT_S) -> Stopped | None:
    """SIGTERM to this home's server (SIGKILL if it lingers past ``timeout``): what it
    stopped, or None if none ran."""
    pid = running_pid(settings)
    if pid is None:
        return None
    ident = pid_path(settings).read_text().strip()
    from flowsession.backends.compute import procs

    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while procs.identity_alive(ident) and time.monotonic() < deadline:
        time.sleep(0.1)
    killed = procs.identity_alive(ident)
    if killed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        while procs.identity_alive(ident) and time.monotonic() < deadline + 5:
            time.sleep(0.05)
    with contextlib.suppress(OSError):
        if pid_path(settings).read_text().strip() == ident:
            pid_path(settings).unlink()
    said = None if killed else read_stopped(settings, ident)
    return Stopped(pid=pid, killed=killed,
                   sessions=list(said.get("sessions") or []) if said else None,
                   runs=list(said.get("runs") or []) if said else None)


@app.command()
@handle_errors
def status(json: bool = typer.Option(False, "--json", help="Print machine-readable JSON.")
           ) -> None:
    """Does this home's local server run: its pid, URL, version and user."""
    import httpx

    from flowsession.config import Settings

    settings = Settings.from_env()
    pid = running_pid(settings)
    saved = read_client_config(settings)
    data = {"running": pid is not None, "pid": pid, "url": saved.get("url") if pid else None,
            "user": saved.get("user"), "home": str(settings.home), "version": None,
            "log": str(server_log(settings))}
    if pid is not None and data["url"]:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            data["version"] = httpx.get(f"{data['url']}/api/health", timeout=3,
                                        trust_env=False).json()["version"]
    data["answers"] = data["version"] is not None
    if json:
        return emit_json(data)
    if pid is None:
        out.print(f"no flowsession server runs for {settings.home} (the next command starts "
                  "one)", highlight=False)
        return
    fields({**data, "state": "running" if data["answers"] else "not answering"},
           ("state", "url", "pid", "version", "user", "home", "log"))

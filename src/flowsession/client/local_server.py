"""Which server the SDK and the CLI speak to, and this home's local server: found, or started.

1. A URL (``Client(url=...)``, else ``FLOWSESSION_URL``), with a token (``token=``, else
   ``FLOWSESSION_TOKEN``, else the one ``client.json`` keeps for that URL): that server,
   wherever it is.
2. Otherwise this home's local server (``FLOWSESSION_HOME``): the one recorded in
   ``server.pid`` and ``client.json`` if it answers ``/api/health``; else one started here and
   now, detached (``flowsession server --port <free port>`` in its own session, its output in
   ``logs/server.log``), so a new user sets nothing up. ``FLOWSESSION_TOKEN`` alone speaks to
   the local server as another user.

Whoever starts it, the local server writes its identity to ``server.pid`` and its URL and a
token of its administrator to ``client.json`` (mode 0600: ``cli/server.py``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from flowsession.backends.compute import procs
from flowsession.config import Settings
from flowsession.environments import fsops
from flowsession.errors import FlowSessionError, InvalidInput

START_TIMEOUT_S = float(os.environ.get("FLOWSESSION_SERVER_START_TIMEOUT", "60"))
HEALTH_TIMEOUT_S = 3.0
log = logging.getLogger("flowsession.client")

#: ``starting(message)``: a context manager around a server's start (the CLI's spinner).
Starting = Callable[[str], AbstractContextManager[Any]]


class ServerStartFailed(FlowSessionError):
    code = "server_start_failed"
    status = 503


@dataclass(frozen=True)
class LocalServer:
    url: str
    token: str | None
    log: Path
    started: bool  # by this call


@dataclass(frozen=True)
class ServerAddress:
    url: str
    token: str
    local: bool  # this home's own local server, which sees this machine's folders
    started: LocalServer | None = None  # the local server this call started


# --- the files of a home's local server ---------------------------------------------------------

def client_config_path(settings: Settings) -> Path:
    """Where the CLI and the SDK find the server's URL and a token (mode 0600)."""
    return settings.home / "client.json"


def pid_path(settings: Settings) -> Path:
    """The local server's identity, ``PID:START-TIME`` (a reused pid is never taken for it)."""
    return settings.home / "server.pid"


def stopped_path(settings: Settings) -> Path:
    """What the local server stopped with itself, written as it exits: ``{"server": its
    identity, "sessions": [ids], "runs": [names still in flight]}``."""
    return settings.home / "server.stopped.json"


def read_stopped(settings: Settings, ident: str) -> dict | None:
    """What the server ``ident`` said it stopped with itself; None if it said nothing (it
    was killed, or kept its sessions)."""
    try:
        data = json.loads(stopped_path(settings).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("server") == ident else None


def read_client_config(settings: Settings) -> dict:
    try:
        data = json.loads(client_config_path(settings).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def running_pid(settings: Settings) -> int | None:
    """The pid of this home's server if it is alive (by its recorded identity), else None."""
    try:
        ident = pid_path(settings).read_text().strip()
    except OSError:
        return None
    if not ident or not procs.identity_alive(ident):
        return None
    return int(ident.split(":", 1)[0])


# --- which server ---------------------------------------------------------------------------

def server_address(url: str | None = None, token: str | None = None, *,
                   settings: Settings | None = None,
                   environ: Mapping[str, str] | None = None,
                   starting: Starting | None = None) -> ServerAddress:
    """The server to speak to and the token (see the module's docstring), starting this
    home's local server when that is the one and none runs."""
    env = os.environ if environ is None else environ
    settings = settings or Settings.from_env(dict(env))
    given = url
    url = url or env.get("FLOWSESSION_URL") or None
    token = token or env.get("FLOWSESSION_TOKEN") or None
    if url:
        saved = read_client_config(settings)
        if token is None and saved.get("url", "").rstrip("/") == url.rstrip("/"):
            token = saved.get("token")
        if not token:
            raise InvalidInput(
                f"no token for the flowsession server at {url}" if given else
                f"FLOWSESSION_URL is {url}, but no token is set for it",
                hint="pass token=, or set FLOWSESSION_TOKEN (an Owner issues one: flowsession "
                     "user create NAME, or flowsession token create)")
        return ServerAddress(url=url, token=token, local=_is_local(settings, url))
    local = ensure_local_server(settings, starting=starting)
    token = token or local.token
    if not token:
        raise InvalidInput(f"the local server of {settings.home} runs, but "
                           f"{client_config_path(settings)} holds no token for you",
                           hint="set FLOWSESSION_TOKEN, or stop the server (flowsession server "
                                "stop) and try again")
    return ServerAddress(url=local.url, token=token, local=True,
                         started=local if local.started else None)


def _is_local(settings: Settings, url: str) -> bool:
    """Is ``url`` this home's own local server (which sees this machine's folders)?"""
    saved = read_client_config(settings).get("url", "")
    return bool(saved) and saved.rstrip("/") == url.rstrip("/") \
        and running_pid(settings) is not None


# --- this home's local server ---------------------------------------------------------------

def ensure_local_server(settings: Settings, *, port: int | None = None,
                        starting: Starting | None = None) -> LocalServer:
    """This home's local server: the running one, or a new one started and answering."""
    running = _running(settings)
    if running is not None:
        return running
    with _lock(settings):
        running = _running(settings, wait=2)  # another command may have started it
        if running is not None:
            return running
        if running_pid(settings) is not None:  # alive but never answering: say so
            raise ServerStartFailed(
                f"the local flowsession server of {settings.home} (pid "
                f"{running_pid(settings)}) does not answer",
                hint=f"see its log, {server_log(settings)}; stop it: flowsession server stop")
        with (starting or _logged)(f"starting the flowsession server of {settings.home} ..."):
            local = _start(settings, port)
        log.info("started the local flowsession server at %s (its log: %s; flowsession "
                 "server stop)", local.url, local.log)
        return local


def server_log(settings: Settings) -> Path:
    return settings.logs_dir / "server.log"


def _logged(message: str) -> AbstractContextManager[None]:
    log.info("%s", message)
    return contextlib.nullcontext()


def _healthy(url: str, timeout: float = HEALTH_TIMEOUT_S) -> bool:
    try:
        return httpx.get(f"{url}/api/health", timeout=timeout,
                         trust_env=False).status_code == 200  # never through a proxy
    except httpx.HTTPError:
        return False


def _running(settings: Settings, wait: float = START_TIMEOUT_S) -> LocalServer | None:
    """This home's server, if it runs and answers (waiting up to ``wait`` seconds for one
    still starting)."""
    pid = running_pid(settings)
    if pid is None:
        return None
    deadline = time.monotonic() + wait
    while True:
        saved = read_client_config(settings)
        url = saved.get("url")
        if url and _healthy(url):
            return LocalServer(url=url, token=saved.get("token"), log=server_log(settings),
                               started=False)
        if running_pid(settings) is None or time.monotonic() > deadline:
            return None  # it died meanwhile, or never answers: start another
        time.sleep(0.2)


def _lock(settings: Settings) -> AbstractContextManager[None]:
    """One process at a time decides whether to start this home's server."""
    return fsops.locked(settings.home / "server.lock")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(settings: Settings, port: int | None) -> LocalServer:
    log_file = server_log(settings)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("FLOWSESSION_URL", "FLOWSESSION_TOKEN")}
    env["FLOWSESSION_HOME"] = str(settings.home)
    attempts = 1 if port else 3
    for _ in range(attempts):  # a free port may be taken before the server binds it
        chosen = port or _free_port()
        url = f"http://127.0.0.1:{chosen}"
        with open(log_file, "ab") as fh:
            fh.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} started on {url}\n".encode())
            fh.flush()
            offset = fh.tell()
            proc = subprocess.Popen(
                [sys.executable, "-m", "flowsession.cli.main", "server", "--host", "127.0.0.1",
                 "--port", str(chosen), "--log-level", "warning"],
                stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, env=env,
                cwd=settings.home, start_new_session=True, close_fds=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if _healthy(url, timeout=1):
                saved = read_client_config(settings)
                token = saved.get("token") if saved.get("url") == url else None
                return LocalServer(url=url, token=token, log=log_file, started=True)
            time.sleep(0.1)
        else:  # never answered: do not leave it half-started
            proc.kill()
            proc.wait()
            raise ServerStartFailed(
                f"the local flowsession server did not answer within {START_TIMEOUT_S:g} s",
                hint=f"see its log: {log_file}")
        tail = _tail(log_file, offset)
        if "address already in use" in tail.lower() and not port:
            continue
        raise ServerStartFailed(
            "the local flowsession server could not start" + (f": {_reason(tail)}"
                                                               if _reason(tail) else ""),
            hint=_hint(tail) or f"see its log: {log_file}", details={"log": str(log_file)})
    raise ServerStartFailed("the local flowsession server could not find a free port",
                            hint=f"see its log: {log_file}")


def _tail(log_file: Path, offset: int) -> str:
    with contextlib.suppress(OSError), open(log_file, "rb") as fh:
        fh.seek(offset)
        return fh.read()[-20000:].decode(errors="replace")
    return ""


def _block(tail: str, start: str, stops: tuple[str, ...]) -> str:
    """The text of the first block starting with ``start`` (Rich wraps long lines)."""
    lines = tail.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(start):
            parts = [line.removeprefix(start).strip()]
            for more in lines[i + 1:]:
                if not more.strip() or more.startswith(stops):
                    break
                parts.append(more.strip())
            return " ".join(parts)
    return ""


def _reason(tail: str) -> str:
    """The server's own error (its message, as the CLI would have printed it)."""
    return _block(tail, "error:", ("hint:", "---", "INFO", "WARNING", "ERROR"))


def _hint(tail: str) -> str:
    return _block(tail, "hint:", ("error:", "---", "INFO", "WARNING", "ERROR"))

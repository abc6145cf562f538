"""How the CLI gets its ``Client``: always a server, spoken to over HTTP.

1. ``FLOWSESSION_URL`` (+ ``FLOWSESSION_TOKEN``, or the token client.json keeps for that URL):
   that server, wherever it is.
2. Otherwise this home's local server (``FLOWSESSION_HOME``): the one recorded in
   ``server.pid`` and ``client.json`` if it answers ``/api/health``; else one started here and
   now, detached (``flowsession server --port <free port>`` in its own session, its output in
   ``logs/server.log``), so a new user sets nothing up. ``FLOWSESSION_TOKEN`` alone speaks to
   the local server as another user.

On the local server the CLI's user is its Owner, so flow folders are registered by their path
(``Client(flows_by_path=True)``): the server reads the folder itself, as the CLI did.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from flowsession.cli.output import err
from flowsession.cli.server import read_client_config, running_pid
from flowsession.client import Client, server_config
from flowsession.config import Settings
from flowsession.errors import FlowSessionError, InvalidInput

START_TIMEOUT_S = float(os.environ.get("FLOWSESSION_SERVER_START_TIMEOUT", "60"))
HEALTH_TIMEOUT_S = 3.0


class ServerStartFailed(FlowSessionError):
    code = "server_start_failed"
    status = 503


@dataclass(frozen=True)
class LocalServer:
    url: str
    token: str | None
    log: Path
    started: bool  # by this call


def client(settings: Settings | None = None) -> Client:
    """The CLI's client (see the module's docstring)."""
    settings = settings or Settings.from_env()
    env_url = os.environ.get("FLOWSESSION_URL") or None
    env_token = os.environ.get("FLOWSESSION_TOKEN") or None
    if env_url:
        url, token = server_config(env_url, env_token)
        if not token:
            raise InvalidInput(f"FLOWSESSION_URL is {env_url}, but no token is set for it",
                               hint="set FLOWSESSION_TOKEN (an Owner issues one: flowsession "
                                    "user create NAME, or flowsession token create)")
        local = _is_local(settings, url)
        return Client(url=url, token=token, flows_by_path=local)
    local = ensure_local_server(settings)
    token = env_token or local.token
    if not token:
        raise InvalidInput(f"the local server of {settings.home} runs, but "
                           f"{settings.home / 'client.json'} holds no token for you",
                           hint="set FLOWSESSION_TOKEN, or stop the server (flowsession server "
                                "stop) and run the command again")
    return Client(url=local.url, token=token, flows_by_path=True)


def _is_local(settings: Settings, url: str) -> bool:
    """Is ``url`` this home's own local server (which sees this machine's folders)?"""
    saved = read_client_config(settings).get("url", "")
    return bool(saved) and saved.rstrip("/") == url.rstrip("/") \
        and running_pid(settings) is not None


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
            return LocalServer(url=url, token=saved.get("token"), log=_log(settings),
                               started=False)
        if running_pid(settings) is None or time.monotonic() > deadline:
            return None  # it died meanwhile, or never answers: start another
        time.sleep(0.2)


def _log(settings: Settings) -> Path:
    return settings.logs_dir / "server.log"


@contextlib.contextmanager
def _lock(settings: Settings):
    """One CLI at a time decides whether to start this home's server."""
    settings.home.mkdir(parents=True, exist_ok=True)
    with open(settings.home / "server.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_local_server(settings: Settings, *, port: int | None = None) -> LocalServer:
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
                hint=f"see its log, {_log(settings)}; stop it: flowsession server stop")
        with err.status(f"starting the flowsession server of {settings.home} ..."):
            local = _start(settings, port)
        err.print(f"[dim]started the local flowsession server at {local.url} (its log: "
                  f"{local.log}; flowsession server stop)[/]", highlight=False,
                  soft_wrap=True)
        return local


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(settings: Settings, port: int | None) -> LocalServer:
    log = _log(settings)
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("FLOWSESSION_URL", "FLOWSESSION_TOKEN")}
    env["FLOWSESSION_HOME"] = str(settings.home)
    attempts = 1 if port else 3
    for _ in range(attempts):  # a free port may be taken before the server binds it
        chosen = port or _free_port()
        url = f"http://127.0.0.1:{chosen}"
        with open(log, "ab") as fh:
            fh.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} started by the CLI on "
                     f"{url}\n".encode())
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
                if saved.get("url") == url:
                    return LocalServer(url=url, token=saved.get("token"), log=log, started=True)
                return LocalServer(url=url, token=None, log=log, started=True)
            time.sleep(0.1)
        else:  # never answered: do not leave it half-started
            proc.kill()
            proc.wait()
            raise ServerStartFailed(
                f"the local flowsession server did not answer within {START_TIMEOUT_S:g} s",
                hint=f"see its log: {log}")
        tail = _tail(log, offset)
        if "address already in use" in tail.lower() and not port:
            continue
        raise ServerStartFailed(
            "the local flowsession server could not start" + (f": {_reason(tail)}"
                                                               if _reason(tail) else ""),
            hint=_hint(tail) or f"see its log: {log}", details={"log": str(log)})
    raise ServerStartFailed("the local flowsession server could not find a free port",
                            hint=f"see its log: {log}")


def _tail(log: Path, offset: int) -> str:
    with contextlib.suppress(OSError), open(log, "rb") as fh:
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

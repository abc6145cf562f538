"""How the CLI gets its ``Client``: always a server, spoken to over HTTP, found (or this home's
local server started) exactly as the SDK's ``Client()`` does (``client/local_server.py``); the
CLI adds a spinner while it starts one, and says that it did.

On the local server the CLI's user is its Owner, so flow folders are registered by their path
(``Client(flows_by_path=True)``): the server reads the folder itself.
"""

from __future__ import annotations

from flowsession.cli.output import err
from flowsession.client import Client
from flowsession.client.local_server import LocalServer, server_address
from flowsession.client.local_server import ensure_local_server as _ensure
from flowsession.config import Settings


def client(settings: Settings | None = None) -> Client:
    """The CLI's client (see the module's docstring)."""
    address = server_address(settings=settings or Settings.from_env(), starting=err.status)
    _say_started(address.started)
    return Client(url=address.url, token=address.token, flows_by_path=address.local)


def ensure_local_server(settings: Settings, *, port: int | None = None) -> LocalServer:
    """This home's local server: the running one, or a new one started and answering."""
    local = _ensure(settings, port=port, starting=err.status)
    _say_started(local)
    return local


def _say_started(local: LocalServer | None) -> None:
    if local is not None and local.started:
        err.print(f"[dim]started the local flowsession server at {local.url} (its log: "
                  f"{local.log}; flowsession server stop)[/]", highlight=False, soft_wrap=True)

"""The Python SDK: ``flowsession.Client``, in prompt flow's words (``pf.run``, ``get_details``,
``get_metrics``, ``stream``) plus sessions, over the REST API.

``Client()`` speaks to the server the CLI speaks to (``client/local_server.py``):
``FLOWSESSION_URL`` + ``FLOWSESSION_TOKEN``, or else this home's local server, started in the
background when none runs (``FLOWSESSION_HOME``; its token in ``client.json``).
``Client(url=..., token=...)`` names a server.

A flow is a registered name, or a local folder: uploaded on first use under its folder name,
or on this home's local server registered by its path (the server reads it in place). A local
data file is sent inline, or by its path to the local server. Each method is one request of
the API (``/docs``), or a long operation followed to its end.
"""

from __future__ import annotations

from typing import Any

from flowsession.client.access import Access
from flowsession.client.flows import Flows
from flowsession.client.http import AuthenticationError, Http, PermissionDenied, ServerUnreachable
from flowsession.client.local_server import ServerStartFailed, server_address
from flowsession.client.resources import Resources
from flowsession.client.runs import Runs
from flowsession.client.sessions import Sessions

__all__ = ["AuthenticationError", "Client", "PermissionDenied", "ServerStartFailed",
           "ServerUnreachable"]


class Client(Flows, Runs, Sessions, Resources, Access):
    """``Client()``: the configured server, or this home's local server (started when none
    runs); ``Client(url=..., token=...)``: that server."""

    def __init__(self, url: str | None = None, token: str | None = None, *,
                 timeout: float = 30.0, flows_by_path: bool | None = None):
        """``flows_by_path``: a flow folder is registered by its path (the server reads the
        folder itself, edits apply at once) instead of uploaded. By default, only on this
        home's local server, which sees this machine's files; it needs all:manage, and
        without it folders are uploaded as usual."""
        address = server_address(url, token)
        self._http = Http(address.url, address.token, timeout=timeout)
        self.url = self._http.url
        self.flows_by_path = address.local if flows_by_path is None else flows_by_path
        self._flows: dict[str, str] = {}

    @property
    def user(self) -> str:
        return self._http.me()["user"]

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client(url={self.url!r})"

"""One real ``flowsession server`` for the security tests (a subprocess on a free port), its
administrator, and dana: a Data Scientist, the kind of user the server must be safe from."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import httpx
import pytest
from helpers.server import Server

from flowsession.backends.compute import procs
from flowsession.client import Client
from flowsession.config import Settings


@pytest.fixture(scope="package")
def server(tmp_path_factory, images_dir, index):
    home = tmp_path_factory.mktemp("security") / "home"
    srv = Server(home, images_dir, index.url)
    try:
        yield srv
    finally:
        srv.stop()
        for pid in procs.with_argument_under(str(Settings(home=home).runtime_dir)):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="package")
def admin(server):
    with Client(url=server.url, token=server.token) as c:
        yield c


@pytest.fixture(scope="package")
def dana_token(server, admin) -> str:
    answer = admin._http.request("POST", "/api/users",
                              json={"name": "dana", "roles": ["Data Scientist"]})
    return answer["token"]


@pytest.fixture(scope="package")
def dana(server, dana_token):
    """dana's raw HTTP client: what an attacker sends is not limited to what the SDK does."""
    with httpx.Client(base_url=server.url, timeout=120,
                      headers={"Authorization": f"Bearer {dana_token}"}) as c:
        # a secret of hers makes the server keep its key file (home/secret.key)
        r = c.post("/api/connections", json={"name": "dana-conn", "type": "custom",
                                             "configs": {"k": "v"},
                                             "secrets": {"s": "hush-dana-0123"}})
        assert r.status_code == 201, r.text
        yield c


@pytest.fixture(scope="package")
def secrets(server, dana) -> list[bytes]:
    """Bytes no answer to dana may ever hold: the server's own files' contents and paths."""
    home = server.home
    found = [str(home).encode(), os.path.realpath(home).encode(), server.token.encode(),
             b"SQLite format 3", b"hush-dana-0123"]
    found.append((home / "secret.key").read_bytes().strip())
    passwd = Path("/etc/passwd").read_bytes().splitlines()
    found += [line for line in passwd[:1] if line]
    return found


@pytest.fixture(scope="package")
def tells_nothing(secrets):
    """A check of an answer to dana: none of ``secrets`` in its body or headers."""

    def check(response: httpx.Response) -> httpx.Response:
        said = response.content + b"".join(v for _, v in response.headers.raw)
        for secret in secrets:
            assert secret not in said, (secret, response.status_code, response.text[:500])
        return response

    return check

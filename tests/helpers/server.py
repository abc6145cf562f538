"""A real ``flowsession server`` for tests: a subprocess on a free port of 127.0.0.1, its
administrator's token read from ``client.json``."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from flowsession.client import Client
from flowsession.errors import Conflict, NotFound

REPO = Path(__file__).resolve().parents[2]
EXE = REPO / ".venv" / "bin" / "flowsession"
ADMIN = "ada"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, home: Path, images: Path, index_url: str | None,
                 port: int | None = None, env: dict[str, str] | None = None):
        self.home = home
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home.parent / "server.log"
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("FLOWSESSION_URL", "FLOWSESSION_TOKEN")}
        self.env.update(FLOWSESSION_HOME=str(home), FLOWSESSION_IMAGES_DIR=str(images),
                        FLOWSESSION_USER=ADMIN)  # the default standby pool (1)
        if index_url:
            self.env["FLOWSESSION_INDEX_URL"] = index_url
        self.env.update(env or {})  # the server's settings, e.g. FLOWSESSION_VCPU_QUOTA
        home.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [str(EXE), "server", "--port", str(self.port), "--log-level", "warning"],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        self.token = self._wait_ready()

    def _wait_ready(self, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        config = self.home / "client.json"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}):\n"
                                   + self.log.read_text()[-3000:])
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/api/health", timeout=2).status_code == 200 \
                        and config.exists():
                    saved = json.loads(config.read_text())
                    assert saved["user"] == ADMIN
                    assert config.stat().st_mode & 0o077 == 0  # the token file is private
                    return saved["token"]
            time.sleep(0.1)
        raise RuntimeError("the server did not come up:\n" + self.log.read_text()[-3000:])

    def stop(self) -> None:
        """Its sessions first (through the API, by id: a flow's folder may be gone), then the
        server itself."""
        if self.proc.poll() is None:
            with contextlib.suppress(Exception), Client(url=self.url, token=self.token) as c:
                for session in c.list_sessions():
                    with contextlib.suppress(NotFound, Conflict):
                        c.stop_session_by_id(session.id)
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)



    def kill(self) -> None:
        """SIGKILL: the server dies mid-whatever (its sessions live on)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


@contextlib.contextmanager
def serving(home: Path, images: Path, index_url: str | None, **kw) -> Iterator[Server]:
    """A server for the duration of the block; then its sessions and itself are stopped, and
    any session process still running is killed and fails the test that left it."""
    from flowsession.backends.compute import procs
    from flowsession.config import Settings

    srv = Server(home, images, index_url, **kw)
    try:
        yield srv
    finally:
        srv.stop()
        runtime = Settings(home=home).runtime_dir
        leftovers = procs.with_argument_under(str(runtime))
        for pid in leftovers:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(runtime, ignore_errors=True)
        if leftovers:
            import pytest

            pytest.fail(f"session processes left running after the server stopped: "
                        f"{sorted(leftovers)}\n" + srv.log.read_text()[-3000:])

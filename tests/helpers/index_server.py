"""A local PEP 503 "simple" package index served over HTTP on 127.0.0.1.

Serves every ``*.whl`` in a directory (re-scanned on each request, so wheels
added after start are visible), optionally behind HTTP basic auth, so tests can
point ``uv`` at it with ``--index-url`` and never touch the network.

Routes::

    /simple/                  list of projects
    /simple/<project>/        links to the project's files (#sha256=..., data-requires-python,
                              and PEP 658/714 data-core-metadata when serve_metadata=True)
    /files/<filename>         the wheel
    /files/<filename>.metadata  the wheel's METADATA (PEP 658)

Trailing slashes are optional everywhere; project names are PEP 503 normalized.
"""

from __future__ import annotations

import base64
import hashlib
import html
import re
import socket
import threading
import zipfile
from dataclasses import dataclass
from email.parser import HeaderParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

__all__ = ["LocalIndex", "down_index_url", "normalize_project"]


def normalize_project(name: str) -> str:
    """PEP 503 normalization."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class _WheelInfo:
    filename: str
    project: str  # normalized
    sha256: str  # hex
    requires_python: str | None
    metadata: bytes | None  # raw METADATA bytes, None if unreadable


def _read_wheel(path: Path) -> _WheelInfo:
    data = path.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    project = normalize_project(path.name.split("-", 1)[0])
    metadata: bytes | None = None
    requires_python: str | None = None
    try:
        with zipfile.ZipFile(path) as zf:
            for member in zf.namelist():
                parts = member.split("/")
                if (
                    len(parts) == 2
                    and parts[0].endswith(".dist-info")
                    and parts[1] == "METADATA"
                ):
                    metadata = zf.read(member)
                    break
    except (zipfile.BadZipFile, OSError):
        metadata = None
    if metadata is not None:
        headers = HeaderParser().parsestr(metadata.decode("utf-8", "replace"), headersonly=True)
        rp = headers.get("Requires-Python")
        requires_python = rp.strip() if rp else None
    return _WheelInfo(path.name, project, sha256, requires_python, metadata)


class _Handler(BaseHTTPRequestHandler):
    server_version = "flowsession-test-index/1.0"
    server: _Server

    # -- plumbing ---------------------------------------------------------------------

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        self.server.index.log.append(format % args)

    def do_GET(self) -> None:
        self._handle(send_body=True)

    def do_HEAD(self) -> None:
        self._handle(send_body=False)

    def _authorized(self) -> bool:
        expected = self.server.index._expected_auth
        if expected is None:
            return True
        return self.headers.get("Authorization", "").strip() == expected

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str,
        send_body: bool,
        extra: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def _not_found(self, send_body: bool) -> None:
        self._send(404, b"Not Found\n", "text/plain; charset=utf-8", send_body)

    # -- routing ----------------------------------------------------------------------

    def _handle(self, send_body: bool) -> None:
        index = self.server.index
        authorized = self._authorized()
        with index._lock:
            index.requests.append((self.command, self.path, authorized))
        if not authorized:
            self._send(
                401,
                b"Unauthorized\n",
                "text/plain; charset=utf-8",
                send_body,
                {"WWW-Authenticate": 'Basic realm="test"'},
            )
            return

        path = unquote(urlsplit(self.path).path)
        parts = [p for p in path.split("/") if p]
        if parts == ["simple"]:
            self._send(200, index._root_page(), "text/html; charset=utf-8", send_body)
        elif len(parts) == 2 and parts[0] == "simple":
            page = index._project_page(parts[1])
            if page is None:
                self._not_found(send_body)
            else:
                self._send(200, page, "text/html; charset=utf-8", send_body)
        elif len(parts) == 2 and parts[0] == "files":
            self._serve_file(parts[1], send_body)
        else:
            self._not_found(send_body)

    def _serve_file(self, name: str, send_body: bool) -> None:
        index = self.server.index
        if name.endswith(".whl.metadata") and index.serve_metadata:
            info = index._wheels().get(name[: -len(".metadata")])
            if info is None or info.metadata is None:
                self._not_found(send_body)
            else:
                self._send(200, info.metadata, "text/plain; charset=utf-8", send_body)
            return
        if name not in index._wheels():
            self._not_found(send_body)
            return
        try:
            data = (index.wheel_dir / name).read_bytes()
        except OSError:
            self._not_found(send_body)
            return
        self._send(200, data, "application/octet-stream", send_body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    index: LocalIndex

    def handle_error(self, request, client_address) -> None:
        # Clients hanging up mid-response are normal; keep stderr quiet.
        import traceback

        self.index.log.append("error from %s:\n%s" % (client_address, traceback.format_exc()))


class LocalIndex:
    """Serve *wheel_dir* as a PEP 503 simple index on ``127.0.0.1:<free port>``.

    Starts on construction; use as a context manager (or call :meth:`stop`)::

        with LocalIndex(wheel_dir) as index:
            subprocess.run(["uv", "pip", "install", "--index-url", index.url, "tinypkg"])

    With ``auth=("user", "secret")`` every request lacking the matching
    ``Authorization: Basic`` header gets ``401`` + ``WWW-Authenticate: Basic realm="test"``.
    """

    def __init__(
        self,
        wheel_dir: Path,
        *,
        auth: tuple[str, str] | None = None,
        serve_metadata: bool = True,
    ) -> None:
        self.wheel_dir = Path(wheel_dir)
        self.auth = auth
        self.serve_metadata = serve_metadata
        #: (method, raw request path, authorized) for every request received.
        self.requests: list[tuple[str, str, bool]] = []
        #: Access / error log lines (instead of stderr).
        self.log: list[str] = []
        self._lock = threading.Lock()
        self._cache: dict[Path, tuple[tuple[int, int], _WheelInfo]] = {}
        self._expected_auth: str | None = None
        if auth is not None:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode("ascii")
            self._expected_auth = f"Basic {token}"

        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.index = self
        self._port: int = self._server.server_address[1]
        self._stopped = False
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"LocalIndex:{self._port}",
            daemon=True,
        )
        self._thread.start()

    # -- public API -------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``"""
        return f"127.0.0.1:{self._port}"

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT/simple`` (no credentials)."""
        return f"http://{self.host}/simple"

    @property
    def auth_url(self) -> str:
        """:attr:`url` with the basic-auth credentials embedded (``http://user:pw@host/simple``)."""
        if self.auth is None:
            return self.url
        user, password = (quote(part, safe="") for part in self.auth)
        return f"http://{user}:{password}@{self.host}/simple"

    def unauthorized_requests(self) -> list[tuple[str, str, bool]]:
        with self._lock:
            return [r for r in self.requests if not r[2]]

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> LocalIndex:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else "running"
        return f"<LocalIndex {self.url} dir={self.wheel_dir} {state}>"

    # -- internals --------------------------------------------------------------------

    def _wheels(self) -> dict[str, _WheelInfo]:
        """Re-scan the directory; wheel contents are cached by (mtime, size)."""
        found: dict[str, _WheelInfo] = {}
        if not self.wheel_dir.is_dir():
            return found
        for path in sorted(self.wheel_dir.glob("*.whl")):
            try:
                st = path.stat()
            except OSError:
                continue
            key = (st.st_mtime_ns, st.st_size)
            with self._lock:
                cached = self._cache.get(path)
            if cached is not None and cached[0] == key:
                info = cached[1]
            else:
                try:
                    info = _read_wheel(path)
                except OSError:
                    continue
                with self._lock:
                    self._cache[path] = (key, info)
            found[path.name] = info
        return found

    def _root_page(self) -> bytes:
        projects = sorted({info.project for info in self._wheels().values()})
        links = "\n".join(
            f'    <a href="/simple/{quote(p)}/">{html.escape(p)}</a><br/>' for p in projects
        )
        return _page("Simple index", links)

    def _project_page(self, project: str) -> bytes | None:
        project = normalize_project(project)
        files = [i for i in self._wheels().values() if i.project == project]
        if not files:
            return None
        links = []
        for info in files:
            attrs = f'href="/files/{quote(info.filename)}#sha256={info.sha256}"'
            if info.requires_python:
                attrs += f' data-requires-python="{html.escape(info.requires_python)}"'
            if self.serve_metadata and info.metadata is not None:
                meta_hash = hashlib.sha256(info.metadata).hexdigest()
                attrs += f' data-core-metadata="sha256={meta_hash}"'
                attrs += f' data-dist-info-metadata="sha256={meta_hash}"'
            links.append(f"    <a {attrs}>{html.escape(info.filename)}</a><br/>")
        return _page(f"Links for {project}", "\n".join(links))


def _page(title: str, body: str) -> bytes:
    return (
        "<!DOCTYPE html>\n<html>\n  <head>\n"
        '    <meta name="pypi:repository-version" content="1.0">\n'
        f"    <title>{html.escape(title)}</title>\n  </head>\n  <body>\n"
        f"    <h1>{html.escape(title)}</h1>\n{body}\n  </body>\n</html>\n"
    ).encode("utf-8")


def down_index_url() -> str:
    """An index URL on 127.0.0.1 whose port nothing listens on (connection refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/simple"

"""The offline test infrastructure: tiny wheels served from a local PEP 503 index to real uv.

No network: every index lives on 127.0.0.1 and uv's cache is a per-module temp dir.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

# `tests` has no __init__.py / conftest path setup of its own; make `tests.helpers` importable
# however pytest was launched (`pytest` vs `python -m pytest`, any cwd).
_REPO_ROOT = Path(__file__).resolve().parents[2]
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from tests.helpers.index_server import LocalIndex, down_index_url  # noqa: E402
from tests.helpers.wheels import PackageSet, build_wheel  # noqa: E402

UV = shutil.which("uv")
needs_uv = pytest.mark.skipif(UV is None, reason="uv is not on PATH")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def uv_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for uv subprocesses: hermetic, no downloads, private cache."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("UV_", "PIP_")) and k not in {"VIRTUAL_ENV", "CONDA_PREFIX"}
    }
    env.update(
        UV_PYTHON_DOWNLOADS="never",
        UV_CACHE_DIR=str(tmp_path_factory.mktemp("uv-cache")),
        UV_NO_CONFIG="1",  # ignore uv.toml / [tool.uv] in cwd and user config
        UV_HTTP_RETRIES="0",  # a refused connection otherwise costs ~13 s of retries
        NO_COLOR="1",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    return env


def run_uv(
    env: dict[str, str], cwd: Path, *args: str, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    assert UV is not None
    full_env = dict(env)
    full_env.update(extra_env or {})
    return subprocess.run(
        [UV, *args], env=full_env, cwd=cwd, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def venv_python(tmp_path: Path, uv_env: dict[str, str]) -> Path:
    """A fresh, empty venv made by uv from the interpreter running the tests."""
    venv = tmp_path / "venv"
    proc = run_uv(uv_env, tmp_path, "venv", "--python", sys.executable, str(venv))
    assert proc.returncode == 0, proc.stderr
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    assert python.exists()
    return python


def pip_install(
    env: dict[str, str],
    cwd: Path,
    python: Path,
    *reqs: str,
    index_url: str | None = None,
    extra_env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    args = ["pip", "install", "--python", str(python)]
    if index_url is not None:
        args += ["--index-url", index_url]
    return run_uv(env, cwd, *args, *reqs, extra_env=extra_env)


def py(python: Path, code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, timeout=60
    )


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


# --------------------------------------------------------------------------- wheels


def test_build_wheel_layout_and_record(tmp_path: Path) -> None:
    path = build_wheel(
        tmp_path, "Tiny.Pkg-x", "1.2.3", requires=["b>=1", "c; python_version>'3'"],
        requires_python=">=3.8",
    )
    assert path.name == "tiny_pkg_x-1.2.3-py3-none-any.whl"
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        di = "tiny_pkg_x-1.2.3.dist-info"
        assert names == {
            "tiny_pkg_x/__init__.py", f"{di}/METADATA", f"{di}/WHEEL", f"{di}/RECORD"
        }
        assert zf.read("tiny_pkg_x/__init__.py").decode() == '__version__ = "1.2.3"\n'
        meta = zf.read(f"{di}/METADATA").decode().splitlines()
        assert meta[:3] == ["Metadata-Version: 2.1", "Name: Tiny.Pkg-x", "Version: 1.2.3"]
        assert "Requires-Python: >=3.8" in meta
        assert "Requires-Dist: b>=1" in meta and "Requires-Dist: c; python_version>'3'" in meta
        wheel = zf.read(f"{di}/WHEEL").decode()
        assert "Root-Is-Purelib: true" in wheel and "Tag: py3-none-any" in wheel
        rows = list(csv.reader(io.StringIO(zf.read(f"{di}/RECORD").decode())))
        assert {r[0] for r in rows} == names
        for name, digest, size in rows:
            if name == f"{di}/RECORD":
                assert (digest, size) == ("", "")
                continue
            data = zf.read(name)
            expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            assert digest == "sha256=" + expected.decode() and int(size) == len(data)


def test_build_wheel_custom_modules_and_package_set(tmp_path: Path) -> None:
    pkgs = PackageSet(tmp_path).add("a", "1", modules={"a.py": "X = 1\n", "a_data/x.txt": "hi"})
    pkgs.add("b", "2.0")
    assert [p.name for p in pkgs] == ["a-1-py3-none-any.whl", "b-2.0-py3-none-any.whl"]
    with zipfile.ZipFile(pkgs.wheels[0]) as zf:
        assert {"a.py", "a_data/x.txt"} <= set(zf.namelist())
    with pytest.raises(TypeError):
        build_wheel(tmp_path, "c", "1", requires="d")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- index server


def test_index_routes_normalization_and_late_wheels(tmp_path: Path) -> None:
    pkgs = PackageSet(tmp_path / "w").add("My.Pkg_x", "1.0", requires_python=">=3.8")
    with LocalIndex(pkgs.directory) as index:
        assert index.url == f"http://{index.host}/simple"
        assert re.fullmatch(r"127\.0\.0\.1:\d+", index.host)

        for suffix in ("/", ""):
            status, headers, body = http_get(index.url + suffix)
            assert status == 200 and headers["Content-Type"].startswith("text/html")
            assert b'href="/simple/my-pkg-x/"' in body

        wheel = pkgs.wheels[0]
        sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
        for project in ("my-pkg-x", "my-pkg-x/", "My.Pkg_X/", "my__pkg.x"):
            status, _, body = http_get(f"{index.url}/{project}")
            assert status == 200, project
            page = body.decode()
            assert f'href="/files/{wheel.name}#sha256={sha}"' in page
            assert 'data-requires-python="&gt;=3.8"' in page

        status, _, body = http_get(f"http://{index.host}/files/{wheel.name}")
        assert status == 200 and body == wheel.read_bytes()

        assert http_get(f"{index.url}/nope/")[0] == 404
        assert http_get(f"http://{index.host}/files/nope-1-py3-none-any.whl")[0] == 404
        assert http_get(f"http://{index.host}/elsewhere")[0] == 404

        # Added after start: served without a restart.
        assert http_get(f"{index.url}/late/")[0] == 404
        pkgs.add("late", "0.1")
        assert http_get(f"{index.url}/late/")[0] == 200
        assert b'"/simple/late/"' in http_get(index.url + "/")[2]

        assert ("GET", "/simple/nope/", True) in index.requests
        assert index.log, "access log is collected instead of printed"


def test_index_basic_auth_and_stop(tmp_path: Path) -> None:
    pkgs = PackageSet(tmp_path / "w").add("a", "1")
    index = LocalIndex(pkgs.directory, auth=("user", "secret"))
    with index:
        status, headers, _ = http_get(index.url + "/a/")
        assert status == 401 and headers["WWW-Authenticate"] == 'Basic realm="test"'
        bad = base64.b64encode(b"user:wrong").decode()
        assert http_get(index.url + "/a/", {"Authorization": f"Basic {bad}"})[0] == 401
        good = base64.b64encode(b"user:secret").decode()
        assert http_get(index.url + "/a/", {"Authorization": f"Basic {good}"})[0] == 200
        # Files are protected too.
        assert http_get(f"http://{index.host}/files/{pkgs.wheels[0].name}")[0] == 401
        assert [r[2] for r in index.requests] == [False, False, True, False]
        assert index.auth_url == f"http://user:secret@{index.host}/simple"
    host, port = index.host.split(":")
    with pytest.raises(OSError):
        socket.create_connection((host, int(port)), timeout=2).close()
    index.stop()  # idempotent


def test_down_index_url_refuses_connections() -> None:
    url = down_index_url()
    m = re.fullmatch(r"http://127\.0\.0\.1:(\d+)/simple", url)
    assert m
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", int(m.group(1))), timeout=2).close()


# --------------------------------------------------------------------------- real uv


@needs_uv
@pytest.mark.parametrize("serve_metadata", [True, False], ids=["pep658", "wheel-only"])
def test_uv_installs_built_wheel(
    tmp_path: Path, uv_env: dict[str, str], venv_python: Path, serve_metadata: bool
) -> None:
    pkgs = PackageSet(tmp_path / "w").add("tinypkg", "1.2.3")
    with LocalIndex(pkgs.directory, serve_metadata=serve_metadata) as index:
        proc = pip_install(uv_env, tmp_path, venv_python, "tinypkg", index_url=index.url)
    assert proc.returncode == 0, proc.stderr
    assert "+ tinypkg==1.2.3" in proc.stderr
    out = py(venv_python, "import tinypkg; print(tinypkg.__version__)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1.2.3"


@needs_uv
def test_uv_resolves_dependencies_from_index(
    tmp_path: Path, uv_env: dict[str, str], venv_python: Path
) -> None:
    pkgs = PackageSet(tmp_path / "w")
    pkgs.add("a", "1.0", requires=["b>=1"]).add("b", "0.9").add("b", "1.1").add("unrelated", "1")
    with LocalIndex(pkgs.directory) as index:
        proc = pip_install(uv_env, tmp_path, venv_python, "a", index_url=index.url)
        fetched = {path for _, path, _ in index.requests}
    assert proc.returncode == 0, proc.stderr
    assert "+ a==1.0" in proc.stderr and "+ b==1.1" in proc.stderr
    out = py(venv_python, "import a, b; print(a.__version__, b.__version__)")
    assert out.stdout.split() == ["1.0", "1.1"], out.stderr
    assert "/simple/b/" in fetched and "/simple/unrelated/" not in fetched


@needs_uv
def test_uv_compile_reports_conflict(tmp_path: Path, uv_env: dict[str, str]) -> None:
    pkgs = PackageSet(tmp_path / "w")
    pkgs.add("a", "1", requires=["c==1"]).add("b", "1", requires=["c==2"])
    pkgs.add("c", "1").add("c", "2")
    (tmp_path / "requirements.in").write_text("a\nb\n")
    with LocalIndex(pkgs.directory) as index:
        proc = run_uv(uv_env, tmp_path, "pip", "compile", "--index-url", index.url,
                      "requirements.in")
    assert proc.returncode == 1, proc.stderr
    assert "No solution found when resolving dependencies" in proc.stderr
    assert "c==1" in proc.stderr and "c==2" in proc.stderr


@needs_uv
def test_uv_reports_missing_package(
    tmp_path: Path, uv_env: dict[str, str], venv_python: Path
) -> None:
    pkgs = PackageSet(tmp_path / "w").add("tinypkg", "1")
    with LocalIndex(pkgs.directory) as index:
        proc = pip_install(uv_env, tmp_path, venv_python, "nosuchpkg", index_url=index.url)
    assert proc.returncode == 1
    assert "nosuchpkg was not found in the package registry" in proc.stderr


@needs_uv
def test_uv_auth_index_without_credentials_fails(
    tmp_path: Path, uv_env: dict[str, str], venv_python: Path
) -> None:
    pkgs = PackageSet(tmp_path / "w").add("tinypkg", "1")
    with LocalIndex(pkgs.directory, auth=("user", "secret")) as index:
        proc = pip_install(uv_env, tmp_path, venv_python, "tinypkg", index_url=index.url)
        assert index.unauthorized_requests(), "uv never hit the index"
        assert not any(ok for _, _, ok in index.requests)
    assert proc.returncode != 0
    assert "401 Unauthorized" in proc.stderr
    assert py(venv_python, "import tinypkg").returncode != 0


@needs_uv
@pytest.mark.parametrize("style", ["UV_INDEX_URL-userinfo", "named-index-env"])
def test_uv_auth_index_with_env_credentials(
    tmp_path: Path, uv_env: dict[str, str], venv_python: Path, style: str
) -> None:
    pkgs = PackageSet(tmp_path / "w").add("tinypkg", "2.0")
    with LocalIndex(pkgs.directory, auth=("user", "secret")) as index:
        if style == "UV_INDEX_URL-userinfo":
            extra = {"UV_INDEX_URL": index.auth_url}
        else:
            extra = {
                "UV_INDEX": f"private={index.url}",
                "UV_INDEX_PRIVATE_USERNAME": "user",
                "UV_INDEX_PRIVATE_PASSWORD": "secret",
            }
        proc = pip_install(uv_env, tmp_path, venv_python, "tinypkg", extra_env=extra)
        assert proc.returncode == 0, proc.stderr
        assert any(ok for _, _, ok in index.requests)
    assert "secret" not in " ".join(proc.args)  # never on the command line
    assert "secret" not in proc.stderr + proc.stdout
    out = py(venv_python, "import tinypkg; print(tinypkg.__version__)")
    assert out.stdout.strip() == "2.0", out.stderr


@needs_uv
def test_uv_down_index_fails_with_connection_error(
    tmp_path: Path, uv_env: dict[str, str], venv_python: Path
) -> None:
    url = down_index_url()
    proc = pip_install(uv_env, tmp_path, venv_python, "tinypkg", index_url=url)
    assert proc.returncode != 0
    err = proc.stderr.lower()
    assert "failed to fetch" in err and "connection refused" in err
    assert url.split("//", 1)[1].split("/", 1)[0] in proc.stderr  # names the host:port

"""The uv environment builder: the only code that runs uv.

An image is a relocatable venv. An environment (or a custom image) is a thin relocatable venv whose
site-packages holds only what it adds, plus a ``.pth`` that puts its image's layers on
``sys.path`` — layered over the image, never a copy of it. What it adds is resolved with the
image's installed versions as constraints, so a flow can never replace what the image provides.

Feed secrets reach uv only through its environment (``UV_DEFAULT_INDEX``/``UV_INDEX``), never
its arguments, and are redacted from everything written to the build log.

A flow's requirements are its user's text, and uv runs here, as the server, outside any
session: so for them uv builds no source distribution (building one runs the package's own
code) and reads no configuration file (a ``uv.toml`` in the flow's folder). An environment's id
covers where its packages came from (its feeds), not only their names and versions: the same
``name==version`` from another index is another package. Custom images (an Owner's, local
wheels allowed) keep uv's defaults.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from flowsession.environments.buildlog import BuildLog, userinfo
from flowsession.environments.requirements import PRIVATE, FlowRequirements, feed_host
from flowsession.errors import (
    BuildFailed,
    IndexUnreachable,
    PackageNotFound,
    RequirementsError,
    Unsatisfiable,
)

_PTH = "_flowsession_layers.pth"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)")
# a wheel named by path or URL ("name @ file:///x/name-1.0-py3-none-any.whl", "/x/name-1.0-...whl")
_WHEEL = re.compile(r"(?:^|/)([A-Za-z0-9][A-Za-z0-9._]*)-([0-9][^-/\s]*)-[^/\s]*\.whl(?:\s|;|$)")


@dataclass(frozen=True)
class ImageLayers:
    """What an environment is layered over: a built image, as the builder needs to see it."""

    ref: str  # "flowsession/runtime:1"
    python: str  # the base interpreter every layer uses
    python_version: str
    platform: str
    site_dirs: tuple[str, ...]  # site-packages of every layer of the image, nearest first
    pins: str  # "name==version" of every package the image has: the resolver's constraints

    @property
    def digest(self) -> str:
        return hashlib.sha256(f"{self.python}\n{self.pins}".encode()).hexdigest()

    def versions(self) -> dict[str, str]:
        return parse_pins(self.pins)

    @property
    def constraints(self) -> str:
        """The resolver's constraints: every package of the image at its exact version."""
        return "".join(f"{name}=={version}\n" for name, version in self.versions().items())


@dataclass(frozen=True)
class EnvSpec:
    image: ImageLayers
    lock: str  # the resolved packages the environment adds, one "name==version" a line
    requirements: FlowRequirements | None = field(default=None, compare=False)


@dataclass(frozen=True)
class PythonInfo:
    base_python: str
    version: str
    platform: str
    site_dir: str


def parse_pins(text: str) -> dict[str, str]:
    """'name==version' lines (as uv writes them) -> {canonical name: version}. A direct
    reference to a wheel (a path, or 'name @ file:///.../name-1.0-py3-none-any.whl') counts
    with the name and version in its file name."""
    out = {}
    for line in text.splitlines():
        m = _PIN.match(line.strip())
        if m:
            out[_canonical(m.group(1))] = m.group(2)
        elif m := _WHEEL.search(line.strip()):
            out[_canonical(m.group(1))] = m.group(2)
    return out


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def tree_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                st = os.lstat(os.path.join(root, f))
            except FileNotFoundError:
                continue
            total += st.st_size
    return total


def fill_private(url: str, credentials: Mapping[str, str]) -> str:
    """Replace ``{private}`` with the secret for the URL's host (percent-encoded userinfo)."""
    if PRIVATE not in url:
        return url
    host = feed_host(url)  # as Feed.host reads it: the secret is chosen for that host
    secret = credentials.get(host)
    if secret is None:
        raise RequirementsError(
            f"the feed at {host} needs a secret ({PRIVATE}) and the identity has none for it",
            hint=f"add one with: flowsession feed set {host}",
        )
    return url.replace(PRIVATE, userinfo(secret))


def _guarded(reqs: FlowRequirements | None) -> list[str]:
    """uv's options for requirements a user sent (a flow's): no source distribution built,
    no configuration file read. None of them for a custom image's (``allow_local``)."""
    if reqs is None or reqs.allow_local:
        return []
    return ["--no-build", "--no-config"]


class UvEnvBuilder:
    """Builds images and environments with uv. Knows nothing of the store or the API."""

    name: ClassVar[str] = "uv"

    def __init__(self, uv: str = "uv", *, default_index: str | None = None):
        self.uv = uv
        self.default_index = default_index

    # --- identity ------------------------------------------------------------------------

    def env_id(self, spec: EnvSpec) -> str:
        key = {
            "image": spec.image.ref,
            "image_digest": spec.image.digest,
            "lock": spec.lock,
            "python": spec.image.python_version,
            "platform": spec.image.platform,
        }
        feeds = [f.url for f in spec.requirements.feeds] if spec.requirements else []
        if feeds and spec.lock.strip():  # the feeds as written: {private}, never a secret
            key["feeds"] = feeds
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]

    # --- resolving -----------------------------------------------------------------------

    async def resolve(
        self,
        image: ImageLayers,
        reqs: FlowRequirements,
        log: BuildLog,
        *,
        credentials: Mapping[str, str] | None = None,
    ) -> str:
        """The pinned packages ``reqs`` adds to ``image`` (one 'name==version' a line, sorted)."""
        if not reqs.requirements:
            return ""
        with tempfile.TemporaryDirectory(prefix="flowsession-resolve-") as tmp:
            req_file = Path(tmp) / "requirements.in"
            cons_file = Path(tmp) / "constraints.txt"
            req_file.write_text(reqs.requirements_text)
            cons_file.write_text(image.constraints + reqs.constraints_text)
            args = ["pip", "compile", str(req_file), "-c", str(cons_file), "--python",
                    image.python, "--no-header", "--no-annotate", "--quiet", *_guarded(reqs)]
            out = await self._run(args, log, feeds=reqs, credentials=credentials,
                                  cwd=reqs.base_dir, what=f"resolve {reqs.source}", image=image)
        image_pkgs = image.versions()
        layer = []
        for line in out.splitlines():
            m = _PIN.match(line.strip())
            name = re.sub(r"[-_.]+", "-", m.group(1)).lower() if m else None
            if line.strip() and not line.lstrip().startswith("#") and name not in image_pkgs:
                layer.append(line.strip())
        return "".join(f"{line}\n" for line in sorted(layer, key=str.lower))

    # --- building ------------------------------------------------------------------------

    async def build(
        self,
        spec: EnvSpec,
        target: Path,
        log: BuildLog,
        *,
        credentials: Mapping[str, str] | None = None,
    ) -> None:
        """A venv at ``target`` layered over ``spec.image`` with ``spec.lock`` installed."""
        await self._venv(target, spec.image.python, log)
        site = self._site_dir(target, spec.image.python_version)
        lines = [f"import site; site.addsitedir({d!r})" for d in spec.image.site_dirs]
        (site / _PTH).write_text("\n".join(lines) + "\n")
        if spec.lock.strip():
            lock_file = target / "flowsession.lock"
            lock_file.write_text(spec.lock)
            reqs = spec.requirements
            await self._run(
                ["pip", "install", "--python", str(target / "bin" / "python"), "--no-deps",
                 "--compile-bytecode", *_guarded(reqs), "-r", str(lock_file)],
                log, feeds=reqs, credentials=credentials,
                cwd=reqs.base_dir if reqs else None, what="install", image=spec.image,
            )
        else:
            log.step("nothing to install beyond the image")

    async def build_base(self, lock_file: Path, python: str, target: Path, log: BuildLog) -> None:
        """A base image: a venv at ``target`` synced exactly to ``lock_file``."""
        await self._venv(target, python, log)
        await self._run(
            ["pip", "sync", "--python", str(target / "bin" / "python"), "--compile-bytecode",
             str(lock_file)],
            log, what="install the image's packages",
        )

    async def inspect(self, venv: Path) -> PythonInfo:
        code = (
            "import json, sys, sysconfig; print(json.dumps([sys._base_executable, "
            "'%d.%d.%d' % sys.version_info[:3], sysconfig.get_platform(), "
            "sysconfig.get_paths()['purelib']]))"
        )
        proc = await asyncio.create_subprocess_exec(
            str(venv / "bin" / "python"), "-S", "-c", code,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise BuildFailed(f"could not start the interpreter in {venv}: {err.decode()[-500:]}")
        base, version, platform, site = json.loads(out)
        site = str(Path(site).resolve()).replace(str(Path(venv).resolve()), str(venv))
        return PythonInfo(base_python=base, version=version, platform=platform, site_dir=site)

    async def freeze(self, venv: Path) -> str:
        """'name==version' of the packages installed in ``venv``'s own site-packages."""
        log_path = venv / ".flowsession-freeze.log"
        with BuildLog(log_path) as log:
            out = await self._run(["pip", "freeze", "--python", str(venv / "bin" / "python")],
                                  log, what="list packages", quiet=True)
        log_path.unlink(missing_ok=True)
        return "".join(f"{line}\n" for line in sorted(out.splitlines(), key=str.lower) if line)

    # --- plumbing --------------------------------------------------------------------------

    @staticmethod
    def _site_dir(venv: Path, python_version: str) -> Path:
        major_minor = ".".join(python_version.split(".")[:2])
        return venv / "lib" / f"python{major_minor}" / "site-packages"

    async def _venv(self, target: Path, python: str, log: BuildLog) -> None:
        await self._run(["venv", "--relocatable", "--python", python, str(target)],
                        log, what="create the venv")

    def _env(self, feeds: FlowRequirements | None, credentials: Mapping[str, str] | None,
             log: BuildLog) -> dict[str, str]:
        env = dict(os.environ)
        env.update(UV_PYTHON_DOWNLOADS="never", UV_NO_PROGRESS="1", NO_COLOR="1")
        for secret in (credentials or {}).values():
            log.add_secret(secret)
        primary = [f.url for f in feeds.feeds if f.primary] if feeds else []
        extra = [f.url for f in feeds.feeds if not f.primary] if feeds else []
        default = primary[-1] if primary else self.default_index
        if default:
            env["UV_DEFAULT_INDEX"] = fill_private(default, credentials or {})
            env.pop("UV_INDEX_URL", None)
        if extra:
            env["UV_INDEX"] = " ".join(fill_private(u, credentials or {}) for u in extra)
            env.pop("UV_EXTRA_INDEX_URL", None)
        return env

    async def _run(
        self,
        args: Sequence[str],
        log: BuildLog,
        *,
        what: str,
        feeds: FlowRequirements | None = None,
        credentials: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        image: ImageLayers | None = None,
        quiet: bool = False,
    ) -> str:
        env = self._env(feeds, credentials, log)
        if not quiet:
            log.step(f"uv {' '.join(args)}")
        proc = await asyncio.create_subprocess_exec(
            self.uv, *args, env=env, cwd=str(cwd) if cwd else None,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        reading = asyncio.ensure_future(proc.stdout.read())
        errors: list[str] = []
        try:
            while line := await proc.stderr.readline():  # uv's steps, logged as they come
                text = line.decode(errors="replace")
                errors.append(text)
                log.write(text if text.endswith("\n") else text + "\n")
            out = await reading
            await proc.wait()
        except BaseException:  # cancelled or interrupted: never leave uv running behind us
            reading.cancel()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            raise
        stdout, stderr = log.redact(out.decode(errors="replace")), log.redact("".join(errors))
        if proc.returncode != 0:
            raise classify_failure(stderr, what=what, image=image, log=log)
        return stdout


def classify_failure(
    stderr: str, *, what: str, image: ImageLayers | None, log: BuildLog
) -> Exception:
    """uv's error output -> the product's error, with what to do about it."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", stderr).strip()
    tail = log.tail()
    summary = _summary(text)
    if re.search(r"lack of valid authentication|401 Unauthorized|403 Forbidden|Missing credentials", text):
        return IndexUnreachable(
            f"{what}: the package index refused the credentials\n{summary}",
            hint="check the identity's secret for the feed: flowsession feed set HOST",
            log_tail=tail, log_path=str(log.path),
        )
    if "not found in the package registry" in text or "was not found in the provided package" in text:
        names = sorted(set(re.findall(r"Because (\S+) was not found", text)))
        return PackageNotFound(
            f"{what}: package {', '.join(names) or 'requested'} was not found in the package index"
            f"\n{summary}",
            hint="check the name and version in the requirements file, and the feed (-i) it uses",
            log_tail=tail, log_path=str(log.path), packages=names,
        )
    if re.search(r"Connection refused|error sending request|dns error|timed out|Failed to fetch"
                 r"|Could not connect|tcp connect error|connection error", text, re.I):
        return IndexUnreachable(
            f"{what}: the package index could not be reached\n{summary}",
            hint="check that the index is up and its URL is right, then build again",
            log_tail=tail, log_path=str(log.path),
        )
    if "No solution found" in text or "unsatisfiable" in text:
        conflict = summary
        if image is not None:
            provided = {n: v for n, v in image.versions().items()
                        if re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", text, re.I)}
            if provided:
                conflict += f"\nimage {image.ref} provides: " + ", ".join(
                    f"{n}=={v}" for n, v in sorted(provided.items()))
        return Unsatisfiable(
            f"{what}: the requirements cannot be satisfied together\n{conflict}",
            hint="relax the conflicting versions in the requirements file; versions the image "
            "provides cannot change (use another image version or a custom image)",
            log_tail=tail, log_path=str(log.path),
        )
    return BuildFailed(f"{what} failed\n{summary}", hint=f"see the build log: {log.path}",
                       log_tail=tail, log_path=str(log.path))


def _summary(text: str) -> str:
    """uv's explanation without its noise (progress lines, 'hint:' boilerplate)."""
    keep = [ln.rstrip() for ln in text.splitlines()
            if ln.strip() and not ln.lstrip().startswith(("Resolved", "Using Python"))]
    return "\n".join(keep[-15:])

"""Run a session's processes inside a bubblewrap (``bwrap``) sandbox.

A session runs a user's flow code. Inside the sandbox it sees the system directories read-only,
exactly the paths its caller binds (the interpreter, the environment and the flow read-only;
its private working directory read-write), a fresh ``/tmp``, its own ``/proc`` (own PID
namespace: other sessions' processes are invisible and unsignalable) and only the environment
variables it is given. It must never see other sessions' directories, the control plane's
database or its secret key: so the caller binds exact paths, never the home directory, and
``wrap()`` refuses binds of ``/``, of a home directory, or of an ancestor of a ``hidden`` path.

When flowsession runs as root, bwrap would keep every capability inside; ``--cap-drop ALL``
removes them (with no_new_privs, set by bwrap, exec cannot regain them), so the sandboxed
"root" cannot remount its read-only binds or mount anything. ``/etc`` is bound read-only
(resolv.conf, CA certificates, passwd) with ``/etc/shadow`` and ``/etc/gshadow`` masked, and
every other file or folder of it that the host keeps from other users (``shadow-``, private
keys, a database's configuration): uid 0 without capabilities still reads what root owns.

No ``--die-with-parent`` for a local session: it outlives the request (and the control plane
process) that started it. A Ray session asks for it: it must die with its actor. Stdlib only (control plane code).
"""

from __future__ import annotations

import functools
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

SYSTEM_DIRS = ("/usr", "/bin", "/lib", "/lib64", "/lib32", "/sbin", "/etc")
MASKED_FILES = ("/etc/shadow", "/etc/gshadow")
NAMESPACE_FLAGS = ("--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
                   "--new-session", "--cap-drop", "ALL")
_NOT_INSTALLED = "not sandboxed: bubblewrap is not installed (apt-get install bubblewrap)"


@dataclass
class Sandbox:
    """What one sandboxed process may see. Destinations are absolute paths inside."""

    ro_binds: list[tuple[str, str]] = field(default_factory=list)  # (host source, inside dest)
    rw_binds: list[tuple[str, str]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # the whole environment inside
    chdir: str | None = None
    share_net: bool = True  # flows call model endpoints; False adds --unshare-net
    hidden: list[str] = field(default_factory=list)  # e.g. the database, the secret key
    # killed when the process that started bwrap dies (a Ray session actor's child); a local
    # session outlives the request and the control plane that started it, so not there
    die_with_parent: bool = False


@functools.lru_cache(maxsize=1)
def _probe() -> tuple[str | None, str]:
    """(bwrap path or None, why not). Run once per process: the answer does not change."""
    path = shutil.which("bwrap")
    if path is None:
        return None, _NOT_INSTALLED
    # The same namespaces and mounts wrap() asks for: some containers allow `bwrap true`
    # but forbid a new PID namespace with its own /proc.
    probe = [path, "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev",
             *NAMESPACE_FLAGS, "true"]
    try:
        done = subprocess.run(probe, capture_output=True, text=True, timeout=15,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"not sandboxed: bubblewrap does not run here ({exc})"
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        return None, f"not sandboxed: bubblewrap cannot create its namespaces here ({why})"
    return path, ""


def bwrap_path() -> str | None:
    """The bwrap executable if it is installed *and* works here (checked once, cached)."""
    return _probe()[0]


def describe(enabled: bool) -> str:
    """One line for ``session show``: how the session is isolated, or why it is not."""
    if enabled:
        return ("bubblewrap: read-only environment and flow, private working directory, "
                "own PID namespace")
    return _probe()[1] or "not sandboxed: sandboxing is turned off"


def interpreter_paths(python: str) -> list[str]:
    """The read-only paths ``python`` needs inside a sandbox: its installation and its venv.

    A venv's ``bin/python`` is a symlink (chain) to the real executable, e.g.
    ``/root/.pyenv/versions/3.11.7/bin/python3.11``; its prefix holds the stdlib and libpython.
    The venv directory is returned as given (not resolved): the interpreter finds its
    ``pyvenv.cfg`` from the path it is started as, so that path must exist inside.
    """
    exe = Path(os.path.abspath(python))
    paths = [str(exe.resolve().parent.parent)]
    venv = exe.parent.parent
    cfg = venv / "pyvenv.cfg"
    if cfg.is_file():
        paths.append(str(venv))
        for line in cfg.read_text().splitlines():  # a venv made with --copies has no symlink
            key, _, value = line.partition("=")
            if key.strip() == "home" and value.strip():
                home = str(Path(value.strip()).resolve().parent)
                if home not in paths:
                    paths.insert(1, home)
    return paths


def private_system_paths(top: str = "/etc") -> tuple[list[str], list[str]]:
    """(files, folders) under ``top`` that other users may not read: masked in a sandbox (its
    processes may run as root, and the owner's bits let root read them). Symlinks are left
    alone (what they lead to is judged where it is); a private folder is masked whole."""
    files: list[str] = []
    folders: list[str] = []
    for dirpath, dirnames, filenames in os.walk(top):
        for name in list(dirnames):
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if not stat.S_ISLNK(st.st_mode) and (st.st_mode & 0o005) != 0o005:
                folders.append(path)
                dirnames.remove(name)
        for name in filenames:
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and not st.st_mode & 0o004:
                files.append(path)
    return sorted(set(files) | {f for f in MASKED_FILES if os.path.exists(f)}), sorted(folders)


def _check_bind(src: str, dst: str, hidden: list[str]) -> None:
    if not (os.path.isabs(src) and os.path.isabs(dst)):
        raise ValueError(f"sandbox binds need absolute paths, not {src!r} -> {dst!r}")
    real = os.path.realpath(src)
    homes = {os.path.realpath(os.path.expanduser("~")), "/root", "/home"}
    if real == "/" or real in homes or os.path.dirname(real) == "/home":
        raise ValueError(f"refusing to bind {src}: it would expose a whole home directory "
                         "(bind the exact paths the session needs)")
    for secret in hidden:
        secret = os.path.realpath(secret)
        if secret == real or secret.startswith(real.rstrip("/") + "/"):
            raise ValueError(f"refusing to bind {src}: it would expose {secret}")


def wrap(argv: list[str], sandbox: Sandbox, *, bwrap: str | None = None) -> list[str]:
    """The bwrap command line that runs ``argv`` inside ``sandbox``.

    Raises RuntimeError when bubblewrap is unusable (the message says why), ValueError for a
    bind that would expose too much.
    """
    exe = bwrap or bwrap_path()
    if exe is None:
        raise RuntimeError(describe(False))
    cmd = [exe]
    for d in SYSTEM_DIRS:  # merged-/usr systems: /bin -> usr/bin stays a symlink
        if os.path.islink(d):
            cmd += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            cmd += ["--ro-bind", d, d]
    private_files, private_folders = private_system_paths("/etc")
    for f in private_files:
        cmd += ["--ro-bind", "/dev/null", f]  # nodev bind: opening it fails
    for d in private_folders:
        cmd += ["--tmpfs", d, "--remount-ro", d]  # an empty, read-only folder in its place
    cmd += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", *NAMESPACE_FLAGS]
    if not sandbox.share_net:
        cmd.append("--unshare-net")
    if sandbox.die_with_parent:
        cmd.append("--die-with-parent")
    cmd.append("--clearenv")
    for key, value in sandbox.env.items():
        if not key or "=" in key:
            raise ValueError(f"invalid environment variable name {key!r}")
        cmd += ["--setenv", key, str(value)]
    binds = [("--ro-bind", s, d) for s, d in sandbox.ro_binds]
    binds += [("--bind", s, d) for s, d in sandbox.rw_binds]
    covered = {("--ro-bind", d, d) for d in SYSTEM_DIRS}
    # Parents before children (a rw work dir inside a ro slot); bwrap creates destinations.
    for flag, src, dst in sorted(dict.fromkeys(binds), key=lambda b: b[2].rstrip("/").count("/")):
        _check_bind(src, dst, sandbox.hidden)
        if (flag, src, dst) not in covered:
            cmd += [flag, src, dst]
    if sandbox.chdir:
        cmd += ["--chdir", sandbox.chdir]
    return [*cmd, "--", *argv]

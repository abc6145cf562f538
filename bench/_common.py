"""Pieces the benchmarks share: whole `flowsession` commands against a home's real local
server, whole `pf` commands in the default image, and the cores a session actually has."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXE = REPO / ".venv/bin/flowsession"


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def copy_flow(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for p in dst.rglob("*"):
        p.chmod(0o644 if p.is_file() else 0o755)
    return dst


def cli_env(home: Path, images_dir: Path, **extra: str) -> dict:
    """The environment of a `flowsession` command speaking to ``home``'s local server."""
    env = {k: v for k, v in os.environ.items() if k not in ("FLOWSESSION_URL",
                                                           "FLOWSESSION_TOKEN")}
    env.update(FLOWSESSION_HOME=str(home), FLOWSESSION_IMAGES_DIR=str(images_dir), **extra)
    return env


def fs(env: dict, cwd: Path, *args: str, check: bool = True) -> tuple[float, dict | str]:
    """One whole `flowsession` command: its wall time and its (JSON) output."""
    t0 = time.perf_counter()
    p = subprocess.run([str(EXE), *args], env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if check and p.returncode != 0:
        raise SystemExit(f"flowsession {' '.join(args)}: exit {p.returncode}\n{p.stdout}\n"
                         f"{p.stderr[-3000:]}")
    try:
        return wall, json.loads(p.stdout)
    except ValueError:
        return wall, p.stdout


def fs_run(env: dict, cwd: Path, flow: Path, data: Path, n: int, *extra: str) -> dict:
    """`flowsession run create --flow F --data D --json [extra]`, checked: Completed, n lines."""
    wall, r = fs(env, cwd, "run", "create", "--flow", str(flow), "--data", str(data), "--json",
                 *extra)
    if not isinstance(r, dict) or r.get("status") != "Completed" or r.get("completed") != n:
        raise SystemExit(f"flowsession run of {flow.name} ({n} lines) went wrong: "
                         f"{json.dumps(r)[:2000] if isinstance(r, dict) else r[-2000:]}")
    duration = r.get("duration")  # "12.34 s" as the CLI shows it
    duration = float(duration.split()[0]) if isinstance(duration, str) else duration
    return {"wall": wall, "duration": duration, "failed": r.get("failed"),
            "system_metrics": r.get("system_metrics"), "throttle": r.get("throttle"),
            "name": r.get("name")}


def server_start(env: dict) -> float:
    """`flowsession server start` (timed apart: the benchmarks do not count it)."""
    return fs(env, REPO, "server", "start")[0]


def server_stop(env: dict, cwd: Path, flows: list[Path] = ()) -> None:
    for flow in flows:  # each session stopped by name first (a server stop stops any left)
        subprocess.run([str(EXE), "session", "stop", str(flow)], env=env, cwd=cwd,
                       capture_output=True)
    subprocess.run([str(EXE), "server", "stop"], env=env, capture_output=True)


def session_cores(env: dict, cwd: Path, flow: Path) -> tuple[int, str]:
    """The cores the flow's running session can use, from `session show --json` (its VM size
    and the limits that hold it) and `compute sizes --json`: the VM size's vCPUs when a cgroup
    holds it to them, never more than this machine's cores."""
    _, s = fs(env, cwd, "session", "show", str(flow), "--json")
    _, sizes = fs(env, cwd, "compute", "sizes", "--json")
    vcpu = next((z["vcpu"] for z in sizes["sizes"] if z["name"] == s.get("vm_size")), None)
    machine = machine_cores()
    limits = s.get("limits") or ""
    if vcpu is not None and limits.startswith("cgroup"):
        cores = max(1, min(machine, int(vcpu)))
        how = f"VM size {s['vm_size']} ({vcpu:g} vCPU, held by {limits.split(':')[0]}) on " \
              f"{machine} machine cores"
    else:
        cores = machine
        how = f"VM size {s.get('vm_size')}, limits: {limits or 'none'}: the machine's {machine}"
    return cores, how


def default_image_python(home: Path) -> Path:
    """The default image's python (built first if needed, from PyPI; FLOWSESSION_IMAGES_DIR
    reuses a built one), with ``home`` as the building home's place."""
    import asyncio
    from dataclasses import replace

    from flowsession.config import Settings
    from flowsession.environments.images import DEFAULT_IMAGE
    from flowsession.environments.service import EnvironmentService
    from flowsession.store import open_store

    base = Settings.from_env()
    settings = replace(base, home=home, images_path=base.images_dir, database_url=None)
    image = asyncio.run(EnvironmentService(settings, open_store(settings.db_url))
                        .images.ensure_built(DEFAULT_IMAGE))
    return Path(image.path) / "bin" / "python"


def pf_argv(python: Path) -> list[str]:
    """`pf` of promptflow-devkit in the image whose python this is."""
    return [str(python), "-m", "promptflow._cli._pf.entry"]


def pf_env(home: Path) -> dict:
    home.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "HOME": str(home), "PYTHONPATH": str(REPO / "bench"),
            "PYTHON_KEYRING_BACKEND": "pf_keyring.FileKeyring"}  # pf's connection key


def timed_cmd(argv: list[str], env: dict | None = None, cwd: Path | None = None) -> float:
    """One whole command, checked, output captured: its wall time."""
    t0 = time.perf_counter()
    p = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(argv)}: exit {p.returncode}\n{p.stdout[-2000:]}\n"
                         f"{p.stderr[-3000:]}")
    return time.perf_counter() - t0

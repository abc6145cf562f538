"""A compute's VM size and a session's sandbox, enforced on real processes.

Real cgroups (skipped where this process cannot create a group) and real bubblewrap (skipped
where it is missing or cannot make namespaces). Each test checks what a user would notice: a
flow that outgrows its memory is killed, a busy loop gets only its vCPU share, a session cannot
read the control plane's database or another session's files, and so on.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from flowsession.backends.compute import sandbox as sb
from flowsession.backends.compute.limits import Limits, detect

MB = 10**6
PY = sys.executable
WAIT_THEN = "import sys; sys.stdin.readline()\n"  # the test adds the pid, then says go


# --- limits ----------------------------------------------------------------------------------

@pytest.fixture
def cgroups() -> Limits:
    mode = detect()
    if mode == "rlimit":
        pytest.skip("this process cannot create cgroups here (not root, or /sys/fs/cgroup "
                    "read-only): only the rlimit fallback is available")
    return Limits(mode)


@pytest.fixture
def compute(cgroups: Limits):
    """make(vcpu, memory_bytes) -> a fresh compute group; groups and make.procs cleaned up."""
    made: list[dict] = []
    procs: list[subprocess.Popen] = []

    def make(vcpu: float = 1.0, memory_bytes: int = 1000 * MB) -> dict:
        made.append(cgroups.create(f"test-{uuid.uuid4().hex[:10]}", vcpu, memory_bytes))
        return made[-1]

    make.procs = procs
    yield make
    for handle in made:
        cgroups.destroy(handle)
    for p in procs:
        p.kill()
        p.communicate()


def start_in(limits: Limits, handle: dict, code: str, procs: list) -> subprocess.Popen:
    """A python process added to the compute before it runs ``code``."""
    p = subprocess.Popen([PY, "-c", WAIT_THEN + code], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs.append(p)
    limits.add_process(handle, p.pid)
    return p


def go(p: subprocess.Popen) -> None:
    p.stdin.write("go\n")
    p.stdin.flush()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_detect_finds_the_cgroup_hierarchy_this_machine_has():
    """As root, the hierarchy the host mounts is the one used (v2 unified, or v1 memory+cpu),
    never the rlimit fallback."""
    if os.geteuid() != 0:
        pytest.skip("needs root: cgroups are made by root")
    if Path("/sys/fs/cgroup/cgroup.controllers").is_file():
        assert detect() == "cgroup2"
    else:
        assert Path("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists(), \
            "no cgroup v2 nor a v1 memory controller: session limits fall back to rlimits"
        assert detect() == "cgroup1"


def test_detect_falls_back_to_rlimit_where_there_is_no_cgroup_tree(tmp_path):
    assert detect(tmp_path) == "rlimit"


def test_a_flow_that_outgrows_the_memory_limit_is_killed_and_one_that_fits_runs(cgroups, compute):
    handle = compute(vcpu=1, memory_bytes=100 * MB)
    big = start_in(cgroups, handle, "b = b'x' * (400 * 10**6)\nprint('allocated')", compute.procs)
    out, err = big.communicate("go\n", timeout=60)
    assert "allocated" not in out
    assert big.returncode == -signal.SIGKILL or "MemoryError" in err, (big.returncode, err)

    small = start_in(cgroups, handle, "b = b'x' * (20 * 10**6)\nprint('allocated')",
                     compute.procs)
    out, err = small.communicate("go\n", timeout=60)
    assert (small.returncode, out.strip()) == (0, "allocated"), err


def test_a_busy_loop_gets_only_its_half_vcpu(cgroups, compute):
    handle = compute(vcpu=0.5)
    p = start_in(cgroups, handle, "while True: pass", compute.procs)
    go(p)
    time.sleep(0.3)  # past start-up and the first period
    cpu0, t0, acct0 = cpu_seconds(p.pid), time.monotonic(), cgroups.usage(handle)["cpu_seconds"]
    time.sleep(2.0)
    cpu1, t1, acct1 = cpu_seconds(p.pid), time.monotonic(), cgroups.usage(handle)["cpu_seconds"]
    rate = (cpu1 - cpu0) / (t1 - t0)
    print(f"busy loop in a 0.5 vCPU group: {rate:.3f} CPU s per wall s")
    assert 0.3 < rate <= 0.6
    if acct0 is not None:  # usage() reads the group's own accounting
        assert abs((acct1 - acct0) - (cpu1 - cpu0)) < 0.2


def test_a_child_forked_after_joining_is_in_the_compute_too(cgroups, compute):
    handle = compute()
    parent = start_in(cgroups, handle, (
        "import subprocess, sys\n"
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(c.pid, flush=True)\n"
        "sys.stdin.readline()\n"), compute.procs)
    go(parent)
    child = int(parent.stdout.readline())
    assert {parent.pid, child} <= set(cgroups.processes(handle))
    assert f"/flowsession/{handle['compute_id']}" in Path(f"/proc/{child}/cgroup").read_text()


def test_destroy_kills_what_is_left_and_removes_the_groups(cgroups, compute):
    handle = compute()
    added = start_in(cgroups, handle, "import time; time.sleep(300)", compute.procs)
    # command() joins the group before exec: the program is inside from its first instruction
    joined = subprocess.Popen(cgroups.command(handle, [
        "sh", "-c", "grep -E ':memory:|^0::' /proc/self/cgroup; exec sleep 300"]),
        stdout=subprocess.PIPE, text=True)
    compute.procs.append(joined)
    assert joined.stdout.readline().strip().endswith(f"/flowsession/{handle['compute_id']}")
    deadline = time.monotonic() + 10  # the grep that printed may not have exited yet
    while set(cgroups.processes(handle)) != {added.pid, joined.pid} \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(cgroups.processes(handle)) == {added.pid, joined.pid}

    restarted = Limits(cgroups.mode)  # a fresh control plane, from the stored handle alone
    stored = json.loads(json.dumps(handle))
    restarted.destroy(stored)

    assert added.wait(timeout=5) == -signal.SIGKILL
    assert joined.wait(timeout=5) == -signal.SIGKILL
    assert not any(Path(p).exists() for p in handle["paths"])
    assert restarted.processes(stored) == []
    restarted.destroy(stored)  # already gone: no error


def test_describe_names_the_mechanism_and_the_numbers(cgroups, compute):
    text = cgroups.describe(compute(vcpu=2, memory_bytes=4 * 10**9))
    assert text in ("cgroup v1: 2 vCPU (cpu.cfs_quota_us=200000), memory 4.0 GB "
                    "(memory.limit_in_bytes)",
                    "cgroup v2: 2 vCPU (cpu.max=200000 100000), memory 4.0 GB (memory.max)")


def test_rlimit_fallback_fails_a_large_allocation_in_the_limited_process_only(tmp_path):
    limits = Limits(mode="rlimit")
    handle = limits.create("rl-test", vcpu=1, memory_bytes=256 * MB)
    assert limits.describe(handle) == ("rlimit: address space 1.1 GB per process; "
                                       "CPU not limited (no cgroup access)")
    code = ("import subprocess, sys\n"
            "small = bytearray(20 * 10**6)\n"
            "try:\n    big = bytearray(2 * 2**30)\n    print('big allocated')\n"
            "except MemoryError:\n    print('MemoryError')\n"
            "print(subprocess.run([sys.executable, '-c', 'bytearray(2 * 2**30)'],"
            " capture_output=True).returncode)\n")  # a child inherits the limit
    out, err = start_in(limits, handle, code, []).communicate("go\n", timeout=60)
    assert out.split() == ["MemoryError", "1"], err

    via_command = subprocess.run(limits.command(handle, [PY, "-c", code]),
                                 capture_output=True, text=True, timeout=60)
    assert via_command.stdout.split() == ["MemoryError", "1"], via_command.stderr

    assert resource.getrlimit(resource.RLIMIT_AS)[1] == resource.RLIM_INFINITY
    unaffected = bytearray(2 * 2**30)  # the control plane itself is not limited
    assert len(unaffected) == 2 * 2**30
    assert limits.processes(handle) == []


# --- sandbox ---------------------------------------------------------------------------------

@pytest.fixture
def bwrap() -> str:
    path = sb.bwrap_path()
    if path is None:
        pytest.skip(sb.describe(False))
    return path


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    """Two sessions' directories and the control plane's database and key, side by side."""
    home, sessions = tmp_path / "home", tmp_path / "sessions"
    paths = {"db": home / "flowsession.sqlite", "key": home / "secret.key",
             "flow": sessions / "a" / "flow", "work": sessions / "a" / "work",
             "other": sessions / "b" / "work" / "output.jsonl"}
    for p in ("flow", "work"):
        paths[p].mkdir(parents=True)
    for p in ("db", "key", "other"):
        paths[p].parent.mkdir(parents=True, exist_ok=True)
        paths[p].write_text(f"{p} contents")
    (paths["flow"] / "flow.dag.yaml").write_text("nodes: []\n")
    return paths


def session_sandbox(layout: dict[str, Path]) -> sb.Sandbox:
    return sb.Sandbox(ro_binds=[*((p, p) for p in sb.interpreter_paths(PY)),
                                (str(layout["flow"]), "/session/flow")],
                      rw_binds=[(str(layout["work"]), "/session/work")],
                      env={"PATH": "/usr/bin:/bin", "HOME": "/session/work"},
                      chdir="/session/work", hidden=[str(layout["db"]), str(layout["key"])])


PROBE = """
import json, os, sys
def attempt(path, mode="r", data=None):
    try:
        with open(path, mode) as f:
            return f.write(data) if data else f.read()
    except OSError as exc:
        return type(exc).__name__
seen = {k: attempt(v) for k, v in json.loads(sys.argv[1]).items()}
print(json.dumps({**seen, "write_flow": attempt("/session/flow/new.py", "w", "x"),
                  "write_work": attempt("/session/work/out.txt", "w", "written"),
                  "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
                  "env": sorted(os.environ), "cwd": os.getcwd()}))
"""


def test_a_sandboxed_flow_sees_its_binds_and_nothing_else(bwrap, layout, monkeypatch):
    monkeypatch.setenv("FLOWSESSION_TEST_SECRET", "hunter2")
    args = json.dumps({**{k: str(layout[k]) for k in ("db", "key", "other")},
                       "flow": "/session/flow/flow.dag.yaml"})
    done = subprocess.run(sb.wrap([PY, "-c", PROBE, args], session_sandbox(layout)),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["db"] == seen["key"] == seen["other"] == "FileNotFoundError"
    assert seen["flow"] == "nodes: []\n"
    assert (seen["write_flow"], seen["write_work"]) == ("OSError", len("written"))  # EROFS
    assert (layout["work"] / "out.txt").read_text() == "written"
    assert not (layout["flow"] / "new.py").exists()
    assert seen["cwd"] == "/session/work"
    assert len(seen["pids"]) <= 3, seen["pids"]  # bwrap's init, python: its own PID namespace
    assert "FLOWSESSION_TEST_SECRET" not in seen["env"]
    assert {"PATH", "HOME"} <= set(seen["env"])


def test_wrap_refuses_binds_that_would_expose_the_database_or_a_home(layout):
    with pytest.raises(ValueError, match="expose"):
        sb.wrap(["true"], sb.Sandbox(ro_binds=[(str(layout["db"].parent), "/data")],
                                     hidden=[str(layout["db"])]), bwrap="bwrap")
    with pytest.raises(ValueError, match="home directory"):
        sb.wrap(["true"], sb.Sandbox(ro_binds=[(os.path.expanduser("~"), "/home")]),
                bwrap="bwrap")


def test_without_bubblewrap_the_session_says_it_is_not_sandboxed(monkeypatch):
    monkeypatch.setattr(sb.shutil, "which", lambda name: None)
    sb._probe.cache_clear()
    try:
        assert sb.bwrap_path() is None
        assert sb.describe(False) == ("not sandboxed: bubblewrap is not installed "
                                      "(apt-get install bubblewrap)")
        with pytest.raises(RuntimeError, match="not installed"):
            sb.wrap(["true"], sb.Sandbox())
    finally:
        monkeypatch.undo()
        sb._probe.cache_clear()


def test_interpreter_paths_are_the_real_installation_and_the_venv():
    paths = sb.interpreter_paths(PY)
    assert os.path.realpath(sys.base_prefix) in paths
    if sys.prefix != sys.base_prefix:
        assert sys.prefix in paths


def _live_procs_with(token: str) -> dict[int, str]:
    """pid -> name of the running (not zombie) processes whose command line holds ``token``."""
    found = {}
    for pid in (int(e) for e in os.listdir("/proc") if e.isdigit()):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            running = stat.rsplit(")", 1)[1].split()[0] not in "ZX"
            if running and token in Path(f"/proc/{pid}/cmdline").read_text():
                found[pid] = stat[stat.index("(") + 1:stat.rindex(")")]
        except OSError:
            pass
    return found


def test_a_sandboxed_session_outlives_the_process_that_started_it(bwrap):
    token = f"301.{uuid.uuid4().int % 10**8}"  # a unique sleep length finds our processes
    cmd = sb.wrap(["sleep", token], sb.Sandbox(env={"PATH": "/usr/bin:/bin"}))
    assert "--die-with-parent" not in cmd
    launcher = ("import subprocess, sys\n"
                "subprocess.Popen(sys.argv[1:], start_new_session=True, stdin=subprocess.DEVNULL,"
                " stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n")
    subprocess.run([PY, "-c", launcher, *cmd], check=True, timeout=30)  # its Popen is gone
    deadline = time.monotonic() + 10
    while "sleep" not in _live_procs_with(token).values() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    procs = _live_procs_with(token)
    for pid in sorted(procs, key=lambda p: procs[p] != "sleep"):  # the sleep first
        os.kill(pid, signal.SIGKILL)
    assert "sleep" in procs.values(), "the sandboxed sleep did not outlive its launcher"
    deadline = time.monotonic() + 5
    while _live_procs_with(token) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _live_procs_with(token)

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
    """make(vcpu, memory_bytes) -> a fresh compute group (destroyed afterwards) and started()."""
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


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_detect_says_cgroup1_on_this_machine():
    if os.geteuid() != 0 or not Path("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists():
        pytest.skip("needs root and a cgroup v1 memory hierarchy (this check is for this machine)")
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
    p.stdin.write("go\n")
    p.stdin.flush()
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
    parent.stdin.write("go\n")
    parent.stdin.flush()
    child = int(parent.stdout.readline())
    assert {parent.pid, child} <= set(cgroups.processes(handle))
    assert f"/flowsession/{handle['compute_id']}" in Path(f"/proc/{child}/cgroup").read_text()


def test_command_puts_the_program_in_the_compute_before_it_starts(cgroups, compute):
    handle = compute()
    out = subprocess.run(cgroups.command(handle, [PY, "-c", "print(open('/proc/self/cgroup')"
                                                  ".read())"]),
                         capture_output=True, text=True, timeout=30, check=True).stdout
    memory_line = next(line for line in out.splitlines() if ":memory:" in line or
                       line.startswith("0::"))
    assert memory_line.endswith(f"/flowsession/{handle['compute_id']}")


def test_destroy_kills_what_is_left_and_removes_the_groups(cgroups, compute):
    handle = compute()
    added = start_in(cgroups, handle, "import time; time.sleep(300)", compute.procs)
    joined = subprocess.Popen(cgroups.command(handle, ["sleep", "300"]))
    compute.procs.append(joined)
    deadline = time.monotonic() + 5
    while len(cgroups.processes(handle)) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(cgroups.processes(handle)) == 2

    restarted = Limits(cgroups.mode)  # a fresh control plane, from the stored handle alone
    stored = json.loads(json.dumps(handle))
    restarted.destroy(stored)

    assert added.wait(timeout=5) == -signal.SIGKILL
    assert joined.wait(timeout=5) == -signal.SIGKILL
    assert not any(Path(p).exists() for p in handle["paths"])
    assert restarted.processes(stored) == []
    restarted.destroy(stored)  # already gone: no error


def test_describe_names_the_mechanism_and_the_numbers(cgroups, compute):
    handle = compute(vcpu=2, memory_bytes=4 * 10**9)
    text = cgroups.describe(handle)
    if handle["mode"] == "cgroup1":
        assert text == ("cgroup v1: 2 vCPU (cpu.cfs_quota_us=200000), memory 4.0 GB "
                        "(memory.limit_in_bytes)")
    else:
        assert text == "cgroup v2: 2 vCPU (cpu.max=200000 100000), memory 4.0 GB (memory.max)"


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
    procs: list = []
    p = start_in(limits, handle, code, procs)
    out, err = p.communicate("go\n", timeout=60)
    assert out.split() == ["MemoryError", "1"], err

    via_command = subprocess.run(limits.command(handle, [PY, "-c", code]),
                                 capture_output=True, text=True, timeout=60)
    assert via_command.stdout.split() == ["MemoryError", "1"], via_command.stderr

    assert resource.getrlimit(resource.RLIMIT_AS)[1] == resource.RLIM_INFINITY
    unaffected = bytearray(2 * 2**30)  # the control plane itself is not limited
    assert len(unaffected) == 2 * 2**30
    assert limits.processes(handle) == []
    limits.destroy(handle)


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
    paths = {"db": tmp_path / "home" / "flowsession.sqlite", "key": tmp_path / "home" / "secret.key",
             "flow": tmp_path / "sessions" / "a" / "flow", "work": tmp_path / "sessions" / "a" / "work",
             "other": tmp_path / "sessions" / "b" / "work" / "output.jsonl"}
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
def attempt(fn):
    try:
        return fn()
    except OSError as exc:
        return type(exc).__name__
paths = json.loads(sys.argv[1])
print(json.dumps({
    "db": attempt(lambda: open(paths["db"]).read()),
    "key": attempt(lambda: open(paths["key"]).read()),
    "other": attempt(lambda: open(paths["other"]).read()),
    "flow": attempt(lambda: open("/session/flow/flow.dag.yaml").read()),
    "write_flow": attempt(lambda: open("/session/flow/new.py", "w").write("x")),
    "write_work": attempt(lambda: open("/session/work/out.txt", "w").write("written")),
    "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
    "env": sorted(os.environ),
    "cwd": os.getcwd(),
}))
"""


def test_a_sandboxed_flow_sees_its_binds_and_nothing_else(bwrap, layout, monkeypatch):
    monkeypatch.setenv("FLOWSESSION_TEST_SECRET", "hunter2")
    args = json.dumps({k: str(v) for k, v in layout.items()})
    done = subprocess.run(sb.wrap([PY, "-c", PROBE, args], session_sandbox(layout)),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["db"] == seen["key"] == seen["other"] == "FileNotFoundError"
    assert seen["flow"] == "nodes: []\n"
    assert seen["write_flow"] == "OSError"  # EROFS: the flow is read-only
    assert seen["write_work"] == len("written")
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


def test_interpreter_paths_are_the_real_installation_and_the_venv():
    paths = sb.interpreter_paths(PY)
    assert os.path.realpath(sys.base_prefix) in paths
    if sys.prefix != sys.base_prefix:
        assert sys.prefix in paths


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


def _pids_with(token: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and token in Path(f"/proc/{entry}/cmdline").read_bytes().decode():
                found.append(int(entry))
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
    sleep_pid = None
    deadline = time.monotonic() + 10
    while sleep_pid is None and time.monotonic() < deadline:
        sleep_pid = next((p for p in _pids_with(token)
                          if Path(f"/proc/{p}/comm").read_text().strip() == "sleep"), None)
        time.sleep(0.05)
    try:
        assert sleep_pid is not None, "the sandboxed sleep never started"
        time.sleep(1.0)
        assert _alive(sleep_pid)
    finally:
        for pid in sorted(_pids_with(token), key=lambda p: p != sleep_pid):  # sleep first
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in _pids_with(token)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in _pids_with(token))

"""`flowsession session ...`, `flowsession compute ...` and `flowsession flow test` as a user
types them: the installed console command, one process per command (sessions outlive the
command that started them), real supervisors, bubblewrap, cgroups and uv builds from the local
index."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from helpers.cli import FLOWSESSION
from helpers.flows import make_flow

USER = "ada"




class Cli:
    """Runs `flowsession ARGS...` as its own process, as a user at a shell does."""

    def __init__(self, env: dict[str, str], cwd: Path):
        self.env, self.cwd = env, cwd
        self.flows: list[str] = []  # flows a command may have started a session for
        self.instances: list[str] = []  # compute instances a command may have created
        self.pids: set[int] = set()  # supervisors seen, for the last-resort cleanup

    def __call__(self, *args: str, extra_env: dict[str, str] | None = None,
                 timeout: float = 300) -> subprocess.CompletedProcess:
        if args[:2] in (("session", "start"), ("flow", "test")) and args[2] not in self.flows:
            self.flows.append(args[2])
        if args[:2] == ("compute", "create") and args[2] not in self.instances:
            self.instances.append(args[2])
        proc = subprocess.run([FLOWSESSION, *args], env={**self.env, **(extra_env or {})},
                              cwd=self.cwd, capture_output=True, text=True, timeout=timeout)
        assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
        if "--json" in args and proc.returncode == 0:
            self._remember_pids(proc.stdout)
        return proc

    def json(self, *args: str, **kwargs):
        """Run a `--json` command that must succeed; its parsed output."""
        proc = self(*args, "--json", **kwargs)
        assert proc.returncode == 0, f"{args}: exit {proc.returncode}\n{proc.stderr}"
        return json.loads(proc.stdout)

    def _remember_pids(self, stdout: str) -> None:
        try:
            data = json.loads(stdout)
        except ValueError:
            return
        for row in data if isinstance(data, list) else [data]:
            if isinstance(row, dict) and isinstance(row.get("pid"), int):
                self.pids.add(row["pid"])

    def cleanup(self) -> None:
        """Stop the sessions and delete the instances the test made, as a user would; then
        kill any supervisor still there."""
        try:
            for flow in self.flows:  # exits 1 ("has no session") when already stopped
                self._quietly("session", "stop", flow)
            for name in self.instances:
                self._quietly("compute", "stop", name)
                self._quietly("compute", "delete", name)
        finally:
            for pid in self.pids:  # last resort: the supervisors' own process groups
                try:
                    if os.getpgid(pid) == pid:
                        os.killpg(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass

    def _quietly(self, *args: str) -> None:
        subprocess.run([FLOWSESSION, *args], env=self.env, cwd=self.cwd, capture_output=True,
                       timeout=120)


@pytest.fixture
def fs(settings, tmp_path):
    base = {k: v for k, v in os.environ.items() if not k.startswith("FLOWSESSION_")}
    env = {**base, "FLOWSESSION_HOME": str(settings.home),
           "FLOWSESSION_IMAGES_DIR": str(settings.images_dir),
           "FLOWSESSION_INDEX_URL": settings.index_url,
           "FLOWSESSION_USER": USER, "COLUMNS": "200", "NO_COLOR": "1"}
    cli = Cli(env, tmp_path)
    yield cli
    cli.cleanup()


def version_flow(root: Path, name: str = "f", requirements: str = "tinyalpha==1.0\n") -> Path:
    """A flow whose output says which tinyalpha its session has installed."""
    flow = make_flow(root, name, requirements)
    (flow / "echo.py").write_text(
        "import tinyalpha\nfrom promptflow.core import tool\n\n\n@tool\n"
        "def echo(x: str) -> str:\n    return f'{x} with tinyalpha {tinyalpha.__version__}'\n")
    return flow


def test_a_session_started_from_the_shell_runs_lines_and_stops(fs, tmp_path):
    flow = str(make_flow(tmp_path, "f", "tinyalpha==1.0\n"))

    started = fs.json("session", "start", flow)
    assert started["state"] == "RUNNING"
    assert started["compute_type"] == "serverless" and started["vm_size"] == "medium"
    assert "bubblewrap" in started["sandbox"]
    assert "cgroup" in started["limits"]
    assert started["owner"] == USER and isinstance(started["pid"], int)

    shown = fs.json("session", "show", flow)
    assert (shown["id"], shown["state"], shown["pid"]) == (started["id"], "RUNNING",
                                                           started["pid"])
    listed = fs.json("session", "list")
    assert [(s["id"], s["flow"]) for s in listed] == [(started["id"], started["flow"])]

    tested = fs("flow", "test", flow, "--inputs", "x=hello")
    assert tested.returncode == 0, tested.stderr
    assert json.loads(tested.stdout) == {"y": "hello"}

    events = fs.json("session", "events", flow)
    assert [e["to_state"] for e in events] == ["NOT_STARTED", "BUILDING", "STARTING", "RUNNING"]
    assert {e["actor"] for e in events} == {USER}
    assert {e["session_id"] for e in events} == {started["id"]}

    packages = fs.json("session", "packages", flow)
    assert {"name": "tinyalpha", "version": "1.0", "origin": "requirements"} in packages
    assert any(p["name"] == "promptflow-core" and p["origin"] == "image" for p in packages)

    stopped = fs("session", "stop", flow)
    assert stopped.returncode == 0, stopped.stderr
    assert f"stopped session {started['id']}" in stopped.stdout

    gone = fs("session", "show", flow)
    assert gone.returncode == 1
    assert "has no session" in gone.stderr
    assert "hint:" in gone.stderr and "flowsession session start" in gone.stderr
    assert fs.json("session", "list") == []
    assert fs.json("compute", "list") == []  # the serverless compute went with its session
    assert [e["to_state"] for e in fs.json("session", "events", flow)][-2:] == [
        "STOPPING", "STOPPED"]


def test_flow_test_without_a_session_starts_one_and_prints_the_outputs(fs, tmp_path):
    flow = str(make_flow(tmp_path, "f", "tinyalpha==1.0\n"))
    tested = fs("flow", "test", flow, "--inputs", "x=hi there")
    assert tested.returncode == 0, tested.stderr
    assert json.loads(tested.stdout) == {"y": "hi there"}
    shown = fs.json("session", "show", flow)
    assert shown["state"] == "RUNNING"
    assert (shown["compute_type"], shown["vm_size"], shown["idle_time"]) == (
        "serverless", "small", "1h")  # started implicitly: the smallest VM size


def test_a_session_on_a_compute_instance_stops_with_the_instance(fs, tmp_path):
    flow = str(make_flow(tmp_path, "f", "tinyalpha==1.0\n"))

    refused = fs("session", "start", flow, "--compute-type", "instance", "--instance", "box",
                 "--vm-size", "large")
    assert refused.returncode == 2
    assert "--vm-size" in refused.stderr and "instance's" in refused.stderr
    assert "hint:" in refused.stderr

    sizes = fs.json("compute", "sizes")
    names = [s["name"] for s in sizes["sizes"]]
    assert {"small", "medium", "large", "Standard_D2s_v3"} <= set(names)
    assert sizes["vcpu_quota"] == 8 * len(os.sched_getaffinity(0))  # the machine's
    assert sizes["vcpu_in_use"] == 0

    created = fs.json("compute", "create", "box", "--size", "small", "--idle-shutdown", "2h")
    assert (created["name"], created["kind"], created["state"], created["vm_size"]) == (
        "box", "instance", "RUNNING", "small")
    assert created["idle_shutdown"] == "2h" and created["owner"] == USER
    assert [(c["name"], c["state"]) for c in fs.json("compute", "list")] == [("box", "RUNNING")]
    assert fs.json("compute", "show", "box")["sessions"] == 0

    session = fs.json("session", "start", flow, "--compute-type", "instance", "--instance", "box")
    assert session["state"] == "RUNNING" and session["compute_type"] == "instance"
    assert session["compute_id"] == created["id"]
    shown = fs.json("compute", "show", "box")
    assert shown["sessions"] == 1
    tested = fs("flow", "test", flow, "--inputs", "x=on box")
    assert json.loads(tested.stdout) == {"y": "on box"}, tested.stderr

    stopped = fs("compute", "stop", "box")
    assert stopped.returncode == 0, stopped.stderr
    assert "STOPPED" in stopped.stdout
    last = fs.json("session", "events", flow)[-1]
    assert last["to_state"] == "STOPPED" and last["actor"] == USER
    assert "compute instance box stopped" in last["reason"]
    assert fs("session", "show", flow).returncode == 1  # the flow has no session any more
    box = fs.json("compute", "show", "box")
    assert (box["state"], box["sessions"]) == ("STOPPED", 0)
    assert fs.json("session", "list") == []  # stopped sessions only with --all
    every = fs.json("session", "list", "--all")
    assert [(x["id"], x["state"]) for x in every] == [(session["id"], "STOPPED")], every

    assert fs.json("compute", "start", "box")["state"] == "RUNNING"  # an instance starts again
    assert fs.json("compute", "show", "box")["state"] == "RUNNING"
    assert fs("compute", "stop", "box").returncode == 0

    deleted = fs("compute", "delete", "box")
    assert deleted.returncode == 0, deleted.stderr
    assert "deleted compute box" in deleted.stdout
    assert fs.json("compute", "list") == []
    missing = fs("compute", "show", "box")
    assert missing.returncode == 1
    assert "does not exist" in missing.stderr and "flowsession compute list" in missing.stderr


def test_a_session_on_an_instance_shows_the_instances_vm_size(fs, tmp_path):
    flow = str(make_flow(tmp_path, "f", "tinyalpha==1.0\n"))
    fs.json("compute", "create", "box", "--size", "small")
    session = fs.json("session", "start", flow, "--compute-type", "instance", "--instance", "box")
    assert session["state"] == "RUNNING"
    assert fs.json("session", "show", flow)["vm_size"] == "small"
    assert [s["vm_size"] for s in fs.json("session", "list")] == ["small"]


def test_update_changes_the_idle_time_in_place(fs, tmp_path):
    flow = str(make_flow(tmp_path, "f", "tinyalpha==1.0\n"))
    started = fs.json("session", "start", flow)
    updated = fs.json("session", "update", flow, "--idle-time", "30m")
    assert updated["idle_time"] == "30m"
    assert (updated["id"], updated["pid"], updated["state"]) == (
        started["id"], started["pid"], "RUNNING")
    assert fs.json("session", "show", flow)["idle_time"] == "30m"  # kept, not just printed


def test_an_unknown_vm_size_is_refused_with_where_to_find_the_sizes(fs, tmp_path):
    flow = str(make_flow(tmp_path, "f", "tinyalpha==1.0\n"))
    refused = fs("session", "start", flow, "--vm-size", "Standard_NC99")
    assert refused.returncode == 2
    assert "Standard_NC99" in refused.stderr
    assert "hint:" in refused.stderr and "flowsession compute sizes" in refused.stderr
    assert fs.json("session", "list") == [] and fs.json("compute", "list") == []


def test_save_and_install_from_the_shell_switches_to_the_new_requirements(fs, tmp_path):
    flow = version_flow(tmp_path)
    started = fs.json("session", "start", str(flow))
    tested = fs("flow", "test", str(flow), "--inputs", "x=before")
    assert json.loads(tested.stdout) == {"y": "before with tinyalpha 1.0"}, tested.stderr

    (flow / "requirements.txt").write_text("tinyalpha==2.0\n")
    installed = fs("session", "install", str(flow))
    assert installed.returncode == 0, installed.stderr
    assert f"installed: session {started['id']} runs environment" in installed.stdout

    tested = fs("flow", "test", str(flow), "--inputs", "x=after")
    assert json.loads(tested.stdout) == {"y": "after with tinyalpha 2.0"}, tested.stderr
    shown = fs.json("session", "show", str(flow))
    assert shown["id"] == started["id"] and shown["state"] == "RUNNING"
    assert shown["env_id"] != started["env_id"]
    assert {p["name"]: p["version"] for p in fs.json("session", "packages", str(flow))
            if p["origin"] == "requirements"} == {"tinyalpha": "2.0"}


def test_a_conflicting_requirement_at_install_names_the_packages_and_keeps_running(fs,
                                                                                  tmp_path):
    flow = version_flow(tmp_path)
    started = fs.json("session", "start", str(flow))
    (flow / "requirements.txt").write_text("tinybeta\ntinygamma\n")  # want 1.0 and 2.0
    failed = fs("session", "install", str(flow))
    assert failed.returncode != 0
    assert "tinybeta" in failed.stderr and "tinygamma" in failed.stderr, failed.stderr
    assert "hint:" in failed.stderr

    shown = fs.json("session", "show", str(flow))
    assert (shown["state"], shown["env_id"], shown["pid"]) == (
        "RUNNING", started["env_id"], started["pid"])
    assert "install failed, nothing changed" in fs.json("session", "events", str(flow))[-1][
        "reason"]
    tested = fs("flow", "test", str(flow), "--inputs", "x=still")
    assert json.loads(tested.stdout) == {"y": "still with tinyalpha 1.0"}, tested.stderr


def test_a_size_over_the_vcpu_quota_is_refused_with_the_figures(fs, tmp_path):
    flow = str(make_flow(tmp_path, "f", "tinyalpha==1.0\n"))
    # the quota is a setting of the server: its environment when it starts says it
    started = fs("server", "start", extra_env={"FLOWSESSION_VCPU_QUOTA": "1"})
    assert started.returncode == 0, started.stderr
    refused = fs("session", "start", flow, "--vm-size", "large")
    assert refused.returncode != 0
    assert "needs 4 vCPU" in refused.stderr and "quota of 1 vCPU" in refused.stderr
    assert "hint:" in refused.stderr
    assert fs.json("session", "list") == []
    assert fs.json("compute", "list") == []  # nothing half-made is left
    last = fs.json("session", "events", flow)[-1]
    assert last["to_state"] == "STOPPED" and "the start failed" in last["reason"]


def test_a_session_started_with_an_image_runs_on_that_image(fs, tmp_path):
    """`session start --image`: the session shows the image and the flow sees its packages
    (tinyalpha 2.0, which the flow itself does not ask for)."""
    reqs = tmp_path / "extra.txt"
    reqs.write_text("tinyalpha==2.0\n")
    made = fs.json("image", "create", "team/alpha", "--from", "flowsession/runtime", "-r",
                   str(reqs))
    assert (made["ref"], made["state"]) == ("team/alpha:1", "READY"), made
    flow = str(version_flow(tmp_path, requirements=None))
    session = fs.json("session", "start", flow, "--image", "team/alpha:1")
    assert (session["state"], session["image"]) == ("RUNNING", "team/alpha:1"), session
    assert fs.json("session", "show", flow)["image"] == "team/alpha:1"
    tested = fs("flow", "test", flow, "--inputs", "x=hi")
    assert json.loads(tested.stdout) == {"y": "hi with tinyalpha 2.0"}, tested.stderr


def test_update_moves_a_session_to_another_vm_size_and_to_another_instance(fs, tmp_path):
    """`session update --vm-size` (serverless) and `--instance` (instance to instance): each
    resets the session onto the new compute; `session show` says where it now runs."""
    flow = str(make_flow(tmp_path, "f", "tinyalpha==1.0\n"))
    started = fs.json("session", "start", flow, "--vm-size", "small")
    assert (started["vm_size"], started["compute_type"]) == ("small", "serverless"), started

    fs.json("session", "update", flow, "--vm-size", "medium")
    shown = fs.json("session", "show", flow)
    assert (shown["state"], shown["vm_size"]) == ("RUNNING", "medium"), shown
    assert "2 vCPU" in shown["limits"] and "8.0 GB" in shown["limits"], shown["limits"]
    assert shown["compute_id"] != started["compute_id"], shown  # a new compute of that size

    fs.json("compute", "create", "box", "--size", "small")
    box2 = fs.json("compute", "create", "box2", "--size", "medium")
    other = str(make_flow(tmp_path, "g", "tinyalpha==1.0\n"))
    fs.json("session", "start", other, "--compute-type", "instance", "--instance", "box")
    fs.json("session", "update", other, "--instance", "box2")
    shown = fs.json("session", "show", other)
    assert (shown["state"], shown["compute_type"], shown["compute_id"], shown["vm_size"]) == (
        "RUNNING", "instance", box2["id"], "medium"), shown
    assert [fs.json("compute", "show", name)["sessions"] for name in ("box", "box2")] == [0, 1]
    tested = fs("flow", "test", other, "--inputs", "x=moved")
    assert json.loads(tested.stdout) == {"y": "moved"}, tested.stderr

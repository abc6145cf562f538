"""Everyday use as a prompt flow user meets it (issue 10): pf's habits on the command line,
through the installed console command against the real local server and real sessions."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
from test_cli_runs import Cli

pytestmark = pytest.mark.timeout(300)

ADDER = """def run(a: int, b: int) -> dict:
    return {"sum": a + b}
"""


def adder(root: Path, name: str = "adder") -> Path:
    folder = root / name
    folder.mkdir()
    (folder / "flow.flex.yaml").write_text("entry: adder:run\n")
    (folder / "adder.py").write_text(ADDER)
    (folder / "data.jsonl").write_text('{"x": 1, "y": 2}\n{"x": 3, "y": 4}\n')
    return folder


def test_pf_style_flags_take_several_values_and_a_flow_by_its_name(fs: Cli, tmp_path):
    adder(tmp_path)
    fs.flows.append("adder")
    # several values after one --inputs, as pf takes them; --json as pf's scripts give it
    spread = fs.ok("flow", "test", "adder", "--inputs", "a=1", "b=2", "--json")
    assert json.loads(spread.stdout) == {"sum": 3}
    repeated = fs.ok("flow", "test", "--flow", "adder", "--inputs", "a=5", "--inputs", "b=6")
    assert json.loads(repeated.stdout) == {"sum": 11}

    run = fs.json("run", "create", "--flow", "adder", "--data", "adder/data.jsonl",
                  "--column-mapping", "a=${data.x}", "b=${data.y}", "--name", "spread")
    assert run["status"] == "Completed" and run["completed"] == 2
    details = fs.json("run", "show-details", "spread")
    assert [d["outputs"]["sum"] for d in details] == [3, 7]

    # the flow by its registered name, from a folder where no such folder is
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    other = Cli(fs.env, elsewhere)
    named = other.ok("flow", "test", "adder", "--inputs", "a=2", "b=2")
    assert json.loads(named.stdout) == {"sum": 4}
    owned = other.ok("flow", "test", "ada:adder", "--inputs", "a=3", "b=3")
    assert json.loads(owned.stdout) == {"sum": 6}
    by_name = other.json("run", "create", "--flow", "adder", "--data",
                         str(tmp_path / "adder" / "data.jsonl"), "--column-mapping",
                         "a=${data.x}", "--column-mapping", "b=${data.y}")
    assert by_name["status"] == "Completed" and by_name["completed"] == 2
    shown = other.json("session", "show", "adder")
    assert shown["state"] == "RUNNING"
    missing = other("flow", "test", "nosuch", "--inputs", "a=1")
    assert missing.returncode != 0 and "nosuch" in missing.stderr


def test_a_mapping_to_an_input_the_flow_lacks_is_named_with_the_flows_inputs(fs: Cli,
                                                                            tmp_path):
    adder(tmp_path)
    bad = fs("run", "create", "--flow", "adder", "--data", "adder/data.jsonl",
             "--column-mapping", "a=${data.x}", "b=${data.y}", "c=${data.x}")
    assert bad.returncode == 2
    assert "'c'" in bad.stderr and "its inputs: a, b" in bad.stderr


def test_skip_malformed_lists_the_skipped_lines_in_the_summary(fs: Cli, tmp_path):
    adder(tmp_path)
    fs.flows.append(str(tmp_path / "adder"))
    (tmp_path / "bad.jsonl").write_text('{"x": 1, "y": 1}\n{"x": 2,\n{"x": 3, "y": 3}\n[1]\n')
    run = fs.ok("run", "create", "--flow", "adder", "--data", "bad.jsonl", "--column-mapping",
                "a=${data.x}", "b=${data.y}", "--skip-malformed", "--name", "skipping")
    assert "2 of 2 line(s) completed; 2 malformed data line(s) skipped: line 2, 4" \
        in run.stdout.replace("\n", " ")
    shown = fs.json("run", "show", "skipping")
    assert shown["summary"].endswith("2 malformed data line(s) skipped: line 2, 4")


# --- many flows, one machine -----------------------------------------------------------------


def test_twenty_flows_in_a_row_are_never_refused_idle_sessions_are_reclaimed(fs: Cli,
                                                                              tmp_path):
    fs.env["FLOWSESSION_VCPU_QUOTA"] = "3"  # room for three small sessions
    for n in range(20):
        adder(tmp_path, f"f{n:02d}")
        fs.flows.append(f"f{n:02d}")
        tested = fs.ok("flow", "test", f"f{n:02d}", "--inputs", "a=1", f"b={n}")
        assert json.loads(tested.stdout) == {"sum": 1 + n}
    running = fs.json("session", "list")
    assert sorted(Path(s["flow"]).name for s in running) == ["f17", "f18", "f19"]
    assert {s["vm_size"] for s in running} == {"small"}  # implicit: the smallest size
    events = fs.json("session", "events", "f00")
    stopped = [e for e in events if e["to_state"] == "STOPPED"]
    assert len(stopped) == 1 and stopped[0]["actor"] == "system:quota"
    reason = stopped[0]["reason"]
    assert reason.startswith("reclaimed:") and str(tmp_path / "f03") in reason
    assert "least recently used idle session" in reason
    sizes = fs.ok("compute", "sizes")
    assert "vCPU quota: 3 of 3 in use" in sizes.stderr  # the title: stdout is the table
    assert "set by FLOWSESSION_VCPU_QUOTA" in sizes.stderr


def test_the_local_quota_derives_from_the_machine(fs: Cli):
    answer = fs.json("compute", "sizes")
    cores = len(os.sched_getaffinity(0))
    assert answer["vcpu_quota"] == 8 * cores
    assert answer["vcpu_quota_source"].startswith(
        f"local backend: 8 vCPU per core of this machine's {cores}")
    assert answer["implicit_size"] == "small"


def test_when_nothing_is_idle_the_refusal_lists_what_holds_the_quota(fs: Cli, tmp_path):
    fs.env["FLOWSESSION_VCPU_QUOTA"] = "1"
    sleepy = Path(__file__).resolve().parents[1] / "flows" / "sleepy"
    folder = tmp_path / "sleepy"
    folder.mkdir()
    for f in ("flow.dag.yaml", "nap.py"):
        (folder / f).write_text((sleepy / f).read_text())
    (tmp_path / "long.jsonl").write_text('{"seconds": "120"}\n')
    fs.json("run", "create", "--flow", "sleepy", "--data", "long.jsonl", "--name", "long",
            "--detach")
    for _ in range(600):
        shown = fs.json("run", "show", "long")
        if shown["status"] == "Running" and shown["session_id"]:
            break
    assert shown["status"] == "Running"
    adder(tmp_path)
    refused = fs("flow", "test", "adder", "--inputs", "a=1", "b=2")
    assert refused.returncode == 1
    text = " ".join(refused.stderr.split())
    assert f"session {shown['session_id']} ({folder}, small, 1 vCPU, running run long): " \
           f"flowsession session stop {shown['session_id']}" in text
    assert "none of your sessions is idle" in text
    fs.ok("run", "cancel", "long")
    fs.ok("session", "stop", "sleepy")
    assert json.loads(fs.ok("flow", "test", "adder", "--inputs", "a=1", "b=2").stdout) \
        == {"sum": 3}
    fs.ok("session", "stop", "adder")


# --- container images ----------------------------------------------------------------------


def test_prompt_flows_runtime_image_runs_on_the_default_image_and_says_so(fs: Cli, tmp_path):
    folder = adder(tmp_path)
    fs.flows.append("adder")
    ref = "mcr.microsoft.com/azureml/promptflow/promptflow-runtime-stable:20240619.v2"
    (folder / "flow.flex.yaml").write_text(f"entry: adder:run\nenvironment:\n  image: {ref}\n")
    assert json.loads(fs.ok("flow", "test", "adder", "--inputs", "a=1", "b=1").stdout) \
        == {"sum": 2}
    shown = fs.json("session", "show", "adder")
    assert shown["image"] == "flowsession/runtime:1"
    reasons = [e["reason"] for e in fs.json("session", "events", "adder")]
    assert any(f"environment.image {ref} is prompt flow's runtime image: the session runs on "
               "flowsession/runtime" in r for r in reasons), reasons

    other = adder(tmp_path, "other")
    (other / "flow.flex.yaml").write_text("entry: adder:run\nenvironment:\n  image: "
                                          "python:3.11-slim\n")
    refused = fs("flow", "test", "other", "--inputs", "a=1", "b=1")
    assert refused.returncode == 2
    text = " ".join(refused.stderr.split())
    assert "python:3.11-slim" in text and "container image" in text
    assert "flowsession image create NAME --from-dockerfile Dockerfile" in text


def test_an_azure_runtime_dockerfile_becomes_a_custom_image(fs: Cli, tmp_path):
    (tmp_path / "requirements.txt").write_text("tinyalpha==1.0\n")
    (tmp_path / "Dockerfile").write_text(
        "FROM mcr.microsoft.com/azureml/promptflow/promptflow-runtime:latest\n"
        "COPY ./requirements.txt .\nRUN pip install -r requirements.txt\n")
    name = f"team/azure-{uuid.uuid4().hex[:8]}"  # built now, not adopted from an earlier run
    created = fs.ok("image", "create", name, "--from-dockerfile", "Dockerfile", "--json")
    made = json.loads(created.stdout)
    # the build is visible as it goes: its steps and its packages
    assert "uv pip" in created.stderr and "+ tinyalpha==1.0" in created.stderr
    assert made["ref"] == f"{name}:1" and made["parent"] == "flowsession/runtime:1"
    shown = fs.json("image", "show", name)
    assert shown["installed"]["tinyalpha"] == "1.0"

    (tmp_path / "Dockerfile").write_text(
        "FROM mcr.microsoft.com/azureml/promptflow/promptflow-runtime:latest\n"
        "RUN apt-get update && apt-get install -y unixodbc\n"
        "COPY ./requirements.txt .\nRUN pip install -r requirements.txt\n")
    refused = fs("image", "create", "team/odbc", "--from-dockerfile", "Dockerfile")
    assert refused.returncode == 2
    text = " ".join(refused.stderr.split())
    assert "error: Dockerfile line 2: RUN apt-get (only RUN pip install ...)" in text


# --- messages say what happened --------------------------------------------------------------


def test_installing_what_the_image_provides_says_so_and_computes_agree(fs: Cli, tmp_path,
                                                                      image_versions):
    from helpers.flows import make_flow

    flow = str(make_flow(tmp_path, "f", "tinyalpha==1.0\n"))
    fs.flows.append(flow)
    session = fs.json("session", "start", flow)
    (tmp_path / "f" / "requirements.txt").write_text("tinyalpha==1.0\npackaging\npromptflow\n")
    installed = fs.ok("session", "install", flow)
    said = " ".join(installed.stdout.split())
    assert "the image flowsession/runtime:1 already provides" in said
    assert f"packaging {image_versions['packaging']}" in said
    assert f"promptflow {image_versions['promptflow']}" in said
    assert "the requirements are unchanged" not in said

    listed = fs.json("compute", "list")
    assert len(listed) == 1
    shown = fs.json("compute", "show", listed[0]["name"])
    assert listed[0]["name"] == shown["name"] == session["compute_id"] == shown["id"]
    assert listed[0]["sessions"] == shown["sessions"] == 1
    assert {k: v for k, v in listed[0].items() if k != "last_activity_at"} == \
        {k: v for k, v in shown.items() if k != "last_activity_at"}
    table = fs.ok("compute", "list").stdout
    assert session["compute_id"] in table and "sessions" in table


# --- output fits where it goes -----------------------------------------------------------------


BOX = set("│┃━─┏┓┗┛╭╮╰╯┡┩")


def in_a_terminal(cli: Cli, *args: str, columns: int = 60) -> str:
    """What ``flowsession ARGS`` prints to a terminal ``columns`` wide (a real pty)."""
    import pty
    import subprocess

    from helpers.cli import FLOWSESSION

    leader, follower = pty.openpty()
    env = {**cli.env, "COLUMNS": str(columns), "TERM": "xterm"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen([FLOWSESSION, *args], env=env, cwd=cli.cwd, stdout=follower,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    proc.wait(timeout=120)
    os.close(leader)
    import re
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode())


def test_tables_print_whole_through_a_pipe_and_fit_a_terminal(fs: Cli, tmp_path):
    deep = tmp_path / ("a-rather-long-folder-name-" * 4).rstrip("-")
    folder = deep / "echoer"
    folder.mkdir(parents=True)
    (folder / "flow.flex.yaml").write_text("entry: echoer:run\n")
    (folder / "echoer.py").write_text("def run(text: str) -> dict:\n    return {'out': text}\n")
    flow = str(folder)
    fs.flows.append(flow)
    long_text = "x" * 150
    (folder / "data.jsonl").write_text(
        f'{{"text": "{long_text}"}}\n{{"text": "tab\\there"}}\n')
    run = fs.ok("run", "create", "--flow", flow, "--data", str(folder / "data.jsonl"),
                "--name", "whole", "--stream")
    # the bar ends at the run's end, then the summary follows
    assert "2/2" in run.stderr and "summary: 2 of 2 line(s) completed" in run.stdout

    piped = fs.ok("session", "list").stdout
    lines = piped.splitlines()
    assert lines[0].split("\t")[:3] == ["id", "state", "flow"]
    assert flow in piped and not BOX & set(piped)  # whole, no box drawing
    assert all(len(line.split("\t")) == len(lines[0].split("\t")) for line in lines)

    details = fs.ok("run", "show-details", "whole").stdout.splitlines()
    header = details[0].split("\t")
    first = dict(zip(header, details[1].split("\t")))
    assert first["inputs.text"] == first["outputs.out"] == long_text
    second = dict(zip(header, details[2].split("\t")))
    assert second["outputs.out"] == "tab\\there"  # a tab in a value does not split columns

    shown = in_a_terminal(fs, "session", "list", columns=60)
    assert BOX & set(shown)
    assert max(len(line) for line in shown.splitlines()) <= 60


# --- offline by design -------------------------------------------------------------------------

PROBE = """import os


def run(x: int = 0) -> dict:
    from promptflow._sdk._telemetry.telemetry import is_telemetry_enabled

    home = os.environ.get("PF_HOME_DIRECTORY") or os.path.expanduser("~/.promptflow")
    with open(os.path.join(home, "pf.yaml")) as fh:
        config = fh.read()
    return {"telemetry": is_telemetry_enabled(), "config": config,
            "env": os.environ.get("TELEMETRY_ENABLED")}
"""


def test_promptflow_telemetry_is_off_in_every_session(fs: Cli, tmp_path):
    folder = tmp_path / "probe"
    folder.mkdir()
    (folder / "flow.flex.yaml").write_text("entry: probe:run\n")
    (folder / "probe.py").write_text(PROBE)
    fs.flows.append("probe")
    tested = json.loads(fs.ok("flow", "test", "probe", "--inputs", "x=1").stdout)
    assert tested["telemetry"] is False
    assert "telemetry:\n  enabled: false" in tested["config"]
    assert tested["env"] == "false"
    (folder / "data.jsonl").write_text('{"x": 1}\n')
    fs.ok("run", "create", "--flow", "probe", "--data", "probe/data.jsonl", "--name", "probe")
    details = fs.json("run", "show-details", "probe")
    assert details[0]["outputs"]["telemetry"] is False  # the batch workers too

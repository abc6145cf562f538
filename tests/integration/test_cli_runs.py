"""`flowsession run ...` as a user types it: the installed console command, one process per
command (a run outlives the command that created it), real sessions and batch workers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers.backends import all_cmdlines
from helpers.cli import FLOWSESSION
from helpers.flows import SLOW_YAML
from helpers.openai_endpoint import OpenAIEndpoint

from flowsession.config import Settings
from flowsession.runs.records import RunRecords
from flowsession.store import open_store

USER = "ada"
FLOWS = Path(__file__).resolve().parents[1] / "flows"
pytestmark = pytest.mark.timeout(300)




class Cli:
    """Runs `flowsession ARGS...` as its own process; remembers every flow a run used, to
    stop its session afterwards. ``seen`` is everything any command printed."""

    def __init__(self, env: dict[str, str], cwd: Path):
        self.env, self.cwd = env, cwd
        self.flows: list[str] = []
        self.seen: list[str] = []

    def _note_flow(self, args: tuple[str, ...]) -> None:
        if "--flow" in args:
            flow = args[args.index("--flow") + 1]
            if flow not in self.flows:
                self.flows.append(flow)

    def __call__(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        self._note_flow(args)
        proc = subprocess.run([FLOWSESSION, *args], env=self.env, cwd=self.cwd,
                              capture_output=True, text=True, timeout=timeout)
        self.seen.append(proc.stdout + proc.stderr)
        assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
        assert "unexpected failure" not in proc.stderr, proc.stderr
        return proc

    def ok(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        proc = self(*args, **kwargs)
        assert proc.returncode == 0, f"{args}: exit {proc.returncode}\n{proc.stderr}"
        return proc

    def json(self, *args: str, **kwargs):
        return json.loads(self.ok(*args, "--json", **kwargs).stdout)

    def popen(self, *args: str) -> subprocess.Popen:
        self._note_flow(args)
        return subprocess.Popen([FLOWSESSION, *args], env=self.env, cwd=self.cwd,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def cleanup(self) -> None:
        for flow in self.flows:
            subprocess.run([FLOWSESSION, "session", "stop", flow], env=self.env, cwd=self.cwd,
                           capture_output=True, timeout=120)


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


def flow_copy(tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(FLOWS / name, tmp_path / name))


def output_rows(settings: Settings, name: str) -> list[dict]:
    path = settings.runs_dir / name / "outputs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def stored_positions(settings: Settings, name: str) -> list[int]:
    path = settings.runs_dir / name / "lines.jsonl"
    return [json.loads(raw)["i"] for raw in path.read_text().splitlines()]


def test_a_run_from_the_shell_streams_to_its_summary_and_can_be_inspected(fs, tmp_path,
                                                                          settings):
    flow = flow_copy(tmp_path, "echo")
    created = fs.ok("run", "create", "--flow", "echo", "--data", "echo/data.jsonl",
                    "--name", "first", "--stream")
    assert "status: Completed" in created.stdout
    assert "summary: 4 of 4 line(s) completed" in created.stdout
    assert f"output path: {settings.runs_dir / 'first'}" in created.stdout
    assert output_rows(settings, "first") == [
        {"line_number": 0, "out": "hello"}, {"line_number": 1, "out": "prompt flow"},
        {"line_number": 2, "out": "Grüße, 世界"}, {"line_number": 3, "out": ""}]

    shown = fs.json("run", "show", "first")
    assert shown["status"] == "Completed" and shown["total"] == 4
    assert shown["completed"] == 4 and shown["failed"] == 0 and shown["flow"] == str(flow)
    assert shown["summary"] == "4 of 4 line(s) completed"

    details = fs.json("run", "show-details", "first")
    assert [(d["line_number"], d["inputs"]["text"], d["outputs"]["out"], d["status"])
            for d in details] == [(0, "hello", "hello", "Completed"),
                                  (1, "prompt flow", "prompt flow", "Completed"),
                                  (2, "Grüße, 世界", "Grüße, 世界", "Completed"),
                                  (3, "", "", "Completed")]
    table = fs.ok("run", "show-details", "first").stdout
    assert "inputs.text" in table and "outputs.out" in table and "Grüße, 世界" in table

    logs = fs.ok("run", "logs", "first").stdout
    assert "--- run.log ---" in logs and "run completed: 4 of 4 line(s) completed" in logs
    assert "worker-" in logs  # the workers' logs follow
    assert "crashed" not in logs and "Error" not in logs  # a healthy run's logs are quiet
    as_json = fs.json("run", "logs", "first", "--tail", "1")
    assert as_json[0]["name"] == "run.log" and as_json[0]["text"].startswith(
        "20") and "run completed" in as_json[0]["text"] and "\n" not in as_json[0]["text"]

    # a second run, detached, then followed
    detached = fs.json("run", "create", "--flow", "echo", "--data", "echo/data.jsonl",
                       "--column-mapping", "text=${data.text}", "--name", "second",
                       "--detach")
    assert detached["name"] == "second"
    followed = fs.json("run", "stream", "second")
    assert followed["status"] == "Completed" and followed["completed"] == 4

    listed = fs.json("run", "list")
    assert [(r["name"], r["status"]) for r in listed] == [("second", "Completed"),
                                                          ("first", "Completed")]
    assert "first" in fs.ok("run", "list").stdout

    cancel = fs("run", "cancel", "first")
    assert cancel.returncode == 1
    assert "run first is Completed: there is nothing to cancel" in cancel.stderr
    missing = fs("run", "show", "nosuch")
    assert missing.returncode == 1 and "run 'nosuch' does not exist" in missing.stderr


def test_failed_lines_metrics_and_an_evaluation_from_a_run_yaml(fs, tmp_path, settings):
    flow_copy(tmp_path, "raises")
    flow_copy(tmp_path, "aggregate")
    base = fs.ok("run", "create", "--flow", "raises", "--data", "raises/data.jsonl",
                 "--name", "base")
    assert "summary: 2 of 4 line(s) completed, 2 of 4 failed" in base.stdout
    assert "line 1: Execution failure in 'check': (ValueError) bad input: bad apple" \
        in base.stdout
    details = fs.ok("run", "show-details", "base")
    assert details.stdout.count("(Failed)") == 2
    assert "line 1 failed: Execution failure in 'check': (ValueError) bad input: bad apple" \
        in details.stderr

    (tmp_path / "eval.yml").write_text(
        "$schema: https://azuremlschemas.azureedge.net/promptflow/latest/Run.schema.json\n"
        "flow: aggregate\nrun: base\nname: evaluation\n"
        "column_mapping:\n  answer: ${run.outputs.out}\n  expected: ${run.inputs.text}\n")
    ev = fs.json("run", "create", "-f", "eval.yml", "--stream")
    assert ev["status"] == "Completed" and ev["total"] == 2
    assert output_rows(settings, "evaluation") == [{"line_number": 0, "grade": "correct"},
                                                   {"line_number": 2, "grade": "correct"}]
    assert fs.json("run", "show-metrics", "evaluation") == {"accuracy": 1.0}

    own = fs.ok("run", "create", "--flow", "aggregate", "--data", "aggregate/data.jsonl",
                "--name", "graded")
    assert "status: Completed" in own.stdout
    metrics = fs.ok("run", "show-metrics", "graded").stdout
    assert "accuracy" in metrics and "0.75" in metrics


def test_bad_input_is_refused_with_the_file_line_and_a_hint(fs, tmp_path, settings):
    flow_copy(tmp_path, "echo")
    flow_copy(tmp_path, "variants")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c"\n'
                                        '{"text": "d"}\n')
    bad = fs("run", "create", "--flow", "echo", "--data", "bad.jsonl")
    assert bad.returncode == 2
    assert f"{tmp_path / 'bad.jsonl'} line 3 is not valid JSON" in bad.stderr
    assert "--skip-malformed" in bad.stderr

    missing = fs("run", "create", "--flow", "echo", "--data", "nope.jsonl")
    assert missing.returncode == 2
    assert f"data file {tmp_path / 'nope.jsonl'} does not exist" in missing.stderr

    column = fs("run", "create", "--flow", "echo", "--data", "echo/data.jsonl",
                "--column-mapping", "text=${data.question}")
    assert column.returncode == 2 and "'question'" in column.stderr

    variant = fs("run", "create", "--flow", "variants", "--data", "variants/data.jsonl",
                 "--variant", "${labeled.variant_7}")
    assert variant.returncode == 2 and "variant_7" in variant.stderr
    assert "variant_0, variant_1" in variant.stderr

    base = fs("run", "create", "--flow", "echo", "--run", "ghost",
              "--column-mapping", "text=${run.outputs.out}")
    assert base.returncode == 1 and "base run 'ghost' does not exist" in base.stderr

    assert fs.json("run", "list") == []  # none of these left a run

    skipped = fs.json("run", "create", "--flow", "echo", "--data", "bad.jsonl",
                      "--skip-malformed")
    assert skipped["status"] == "Completed" and skipped["total"] == 3
    assert [r["out"] for r in output_rows(settings, skipped["name"])] == ["a", "b", "d"]


FAILING_ACCURACY = """from typing import List

from promptflow.core import tool


@tool
def accuracy(grades: List[str]) -> float:
    raise ValueError("no metric today")
"""


def test_stream_exits_1_when_the_run_fails_or_is_canceled(fs, tmp_path):
    """`--stream` and `run stream` end as the run ended, as pf's: 0 Completed (its failed lines
    counted and named), 1 Failed or Canceled with the reason on stderr; the run is printed
    either way (--json too)."""
    flow_copy(tmp_path, "raises")
    some = fs("run", "create", "--flow", "raises", "--data", "raises/data.jsonl",
              "--name", "some", "--stream")
    assert some.returncode == 0, some.stderr  # a completed run with failed lines (pf's rule)
    assert "status: Completed" in some.stdout
    assert "summary: 2 of 4 line(s) completed, 2 of 4 failed" in some.stdout
    assert "run some completed with 2 of 4 line(s) failed" in some.stderr, some.stderr
    assert "run show-details some" in some.stderr

    flow = flow_copy(tmp_path, "aggregate")
    (flow / "accuracy.py").write_text(FAILING_ACCURACY)
    broken = fs("run", "create", "--flow", "aggregate", "--data", "aggregate/data.jsonl",
                "--name", "broken", "--stream", "--json")
    assert broken.returncode == 1, broken.stderr
    printed = json.loads(broken.stdout)
    assert printed["name"] == "broken" and printed["status"] == "Failed", printed
    assert "error: run broken failed: the aggregation failed" in broken.stderr, broken.stderr
    assert "no metric today" in broken.stderr and "run logs broken" in broken.stderr
    again = fs("run", "stream", "broken")  # an ended run: at once, with the same exit
    assert again.returncode == 1 and "status: Failed" in again.stdout, again.stderr
    assert "error: run broken failed" in again.stderr
    plain = fs("run", "create", "--flow", "aggregate", "--data", "aggregate/data.jsonl",
               "--name", "plain")
    assert plain.returncode == 0 and "status: Failed" in plain.stdout  # waits as pf's: 0

    flow_copy(tmp_path, "sleepy")
    (tmp_path / "long.jsonl").write_text('{"seconds": "60"}\n' * 3)
    fs.ok("run", "create", "--flow", "sleepy", "--data", "long.jsonl", "--name", "long",
          "--detach")
    following = fs.popen("run", "stream", "long")
    deadline = time.monotonic() + 120
    while fs.json("run", "show", "long")["status"] != "Running":
        assert time.monotonic() < deadline, "the run did not start"
        time.sleep(0.5)
    fs.ok("run", "cancel", "long")
    out, err = following.communicate(timeout=120)
    assert following.returncode == 1, (out, err)
    assert "status: Canceled" in out, out
    assert "error: run long was canceled" in err, err
    assert "Traceback" not in out + err
    shown = fs("run", "stream", "long", "--json")
    assert shown.returncode == 1 and json.loads(shown.stdout)["status"] == "Canceled"


SLOW_TOOL = '''import time

from promptflow.core import tool


@tool
def slow(text: str, seconds: str) -> str:
    time.sleep(float(seconds))
    return text.upper()
'''


def slow_flow(tmp_path: Path, n: int, seconds: str) -> int:
    """tmp_path/slow (a line sleeps ``seconds``) and tmp_path/slow.jsonl of ``n`` lines."""
    flow = tmp_path / "slow"
    flow.mkdir()
    (flow / "flow.dag.yaml").write_text(SLOW_YAML)
    (flow / "slow.py").write_text(SLOW_TOOL)
    (tmp_path / "slow.jsonl").write_text("".join(
        json.dumps({"text": f"l{i}", "seconds": seconds}) + "\n" for i in range(n)))
    return n


def test_a_run_goes_on_when_the_command_that_created_it_is_killed(fs, tmp_path, settings):
    n = slow_flow(tmp_path, 16, "0.4")
    proc = fs.popen("run", "create", "--flow", "slow", "--data", "slow.jsonl",
                    "--name", "orphan", "--workers", "2", "--max-concurrency", "2",
                    "--stream")
    records = RunRecords(open_store(settings.db_url))
    deadline = time.monotonic() + 120
    try:
        while True:
            run = records.find("orphan")
            if run is not None and run.completed >= 3:
                break
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run did not get going"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert records.find("orphan").status == "Running"

    # the session finishes the lines on its own; the server (or a later command) collects them
    runs_dirs = list(Path(settings.runtime_dir).glob("slots/*/state/runs/orphan"))
    assert len(runs_dirs) == 1
    deadline = time.monotonic() + 60
    while not ((runs_dirs[0] / "status.json").exists()
               or records.find("orphan").status == "Completed"):  # collected already
        assert time.monotonic() < deadline, "the session did not finish the run"
        time.sleep(0.1)
    shown = fs.json("run", "show", "orphan")
    assert shown["status"] == "Completed", shown
    assert (shown["total"], shown["completed"], shown["failed"]) == (n, n, 0)
    assert sorted(stored_positions(settings, "orphan")) == list(range(n))
    assert output_rows(settings, "orphan") == [{"line_number": i, "out": f"L{i}"}
                                               for i in range(n)]


def test_a_run_in_flight_when_the_server_stops_goes_on_when_it_starts_again(fs, tmp_path,
                                                                           settings):
    """`server stop` mid-run stops the run's session with the server (nothing of it is left
    running) and says the run goes on; the next command starts the server, which runs the
    lines without a stored result on a new session: every line once."""
    from flowsession.backends.compute import procs

    n = slow_flow(tmp_path, 16, "1")
    fs.ok("run", "create", "--flow", "slow", "--data", "slow.jsonl", "--name", "paused",
          "--workers", "1", "--max-concurrency", "1", "--detach")
    records = RunRecords(open_store(settings.db_url))
    deadline = time.monotonic() + 120
    while (records.find("paused").completed or 0) < 2:
        assert time.monotonic() < deadline, records.find("paused")
        time.sleep(0.1)
    first = records.find("paused").session_id

    stopped = fs.ok("server", "stop")
    assert "and its 1 session(s)" in stopped.stdout, stopped.stdout
    assert "1 run(s) in flight (paused) go on when the server starts again" in stopped.stdout
    assert procs.with_argument_under(str(settings.runtime_dir)) == {}  # nothing left running
    assert records.find("paused").status == "Running"
    assert records.find("paused").completed < n, "the run ended before the server stopped"
    log = (settings.runs_dir / "paused" / "logs" / "run.log").read_text()
    assert "the server was stopped" in log, log

    done = fs.json("run", "stream", "paused")  # starts the server again
    assert (done["status"], done["completed"], done["failed"]) == ("Completed", n, 0), done
    assert done["session_id"] != first
    assert sorted(stored_positions(settings, "paused")) == list(range(n))  # none twice
    assert sorted(r["line_number"] for r in output_rows(settings, "paused")) == list(range(n))


KEY_A = "sk-cli-run-key-A-5e4d3c2b1a"
KEY_B = "sk-cli-run-key-B-0f9e8d7c6b"


class TwoKeyServer(OpenAIEndpoint):
    def __init__(self, keys: list[str]):
        super().__init__(api_key=keys[0], retry_after=0)
        self.keys = keys
        self.keys_in_args = []

    def _authorized(self, authorization, api_key_header, *, azure):
        # while a line calls the endpoint, no process's arguments hold a key
        self.keys_in_args.append(any(k in all_cmdlines() for k in self.keys))
        return any(authorization == f"Bearer {k}" for k in self.keys)

    keys_in_args: list[bool]


def test_an_llm_run_from_the_shell_never_shows_the_key(fs, tmp_path, settings):
    flow_copy(tmp_path, "llm_chat")
    with TwoKeyServer([KEY_A, KEY_B]) as server:
        for name, key in (("open_ai_connection", KEY_A), ("second", KEY_B)):
            (tmp_path / f"{name}.yml").write_text(
                f"name: {name}\ntype: open_ai\napi_key: \"{key}\"\n"
                f"base_url: \"{server.base_url}\"\n")
            fs.ok("connection", "create", "--file", f"{name}.yml")
        r = fs.json("run", "create", "--flow", "llm_chat", "--data", "llm_chat/data.jsonl",
                    "--name", "chat", "--stream")
        assert r["status"] == "Completed", r
        assert [row["answer"] for row in output_rows(settings, "chat")] == [
            "echo: What is the capital of France?", "echo: How many legs does a spider have?",
            "echo: Name a prime number greater than 10."]
        assert {q["authorization"] for q in server.requests} == {f"Bearer {KEY_A}"}
        server.clear()
        over = fs.json("run", "create", "--flow", "llm_chat", "--data", "llm_chat/data.jsonl",
                       "--connections", "chat.connection=second", "--name", "over")
        assert over["status"] == "Completed", over
        assert {q["authorization"] for q in server.requests} == {f"Bearer {KEY_B}"}
        fs.ok("run", "show-details", "chat")
        fs.ok("run", "logs", "chat")
        fs.ok("run", "show", "over")
    assert server.keys_in_args and not any(server.keys_in_args), "a key in a process's args"
    for key in (KEY_A, KEY_B):
        assert not any(key in text for text in fs.seen)


def test_commands_that_finish_a_run_at_the_same_time_agree(fs, tmp_path, settings):
    """`run show` in several terminals while the run's (slow) aggregation runs: one of them
    (or the server following the run) aggregates and writes the outputs; the run ends
    Completed once, with its metrics."""
    flow = flow_copy(tmp_path, "aggregate")
    (flow / "accuracy.py").write_text(
        "import time\nfrom typing import List\n\nfrom promptflow.core import log_metric, tool\n"
        "\n\n@tool\ndef accuracy(grades: List[str]) -> float:\n    time.sleep(6)\n"
        "    value = round(grades.count('correct') / len(grades), 2)\n"
        "    log_metric('accuracy', value)\n    return value\n")
    created = fs.json("run", "create", "--flow", "aggregate", "--data", "aggregate/data.jsonl",
                      "--name", "busy", "--detach")
    assert created["status"] in ("Preparing", "Running")  # submitted: its session runs it
    records = RunRecords(open_store(settings.db_url))
    deadline = time.monotonic() + 60
    while not list(Path(settings.runtime_dir).glob("slots/*/state/runs/busy/status.json")):
        assert time.monotonic() < deadline, records.find("busy")  # every line done
        assert records.find("busy").status != "Completed", "finished before the race"
        time.sleep(0.05)
    shows = [fs.popen("run", "show", "busy", "--json") for _ in range(3)]
    # the race happens: the commands are on their way while the run is being finished
    assert records.find("busy").status != "Completed", "the commands came too late to race"
    results = [(p.wait(timeout=120), *p.communicate()) for p in shows]
    for code, out, err in results:
        assert code == 0, err
        assert "Traceback" not in err
        assert json.loads(out)["name"] == "busy"
    final = fs.json("run", "show", "busy")
    assert final["status"] == "Completed", final
    assert fs.json("run", "show-metrics", "busy") == {"accuracy": 0.75}
    assert [r["grade"] for r in output_rows(settings, "busy")] == [
        "correct", "correct", "wrong", "correct"]
    log = (settings.runs_dir / "busy" / "logs" / "run.log").read_text()
    assert log.count("run completed") == 1, log


def test_flow_test_of_a_flex_class_takes_its_init(fs, tmp_path):
    """`flow test --init` gives a flex flow class its __init__ arguments; without them the
    line fails saying which is missing, and the session stays up."""
    flow_copy(tmp_path, "flex_class")
    fs.flows.append("flex_class")
    refused = fs("flow", "test", "flex_class", "--inputs", "text=x")
    assert refused.returncode != 0 and "prefix" in refused.stderr, refused.stderr
    out = fs.ok("flow", "test", "flex_class", "--inputs", "text=x", "--init", "prefix=>")
    assert json.loads(out.stdout) == {"out": ">x"}


MOODY_PY = """\
import os
from promptflow.core import tool


@tool
def echo(x: str) -> str:
    if x == "b" and os.environ.get("MODE") != "fixed":
        raise ValueError("line b needs MODE=fixed")
    return f"{x}:{os.environ['MODE']}"
"""


def test_a_run_on_a_chosen_size_with_variables_resumed_with_others(fs, tmp_path, settings):
    """`--instance-type` picks the session's VM size (a run asking another size of the running
    session is refused, naming it); `--environment-variables` reach the flow's code;
    `--resume-from` reruns only the failed line, with the variables it is given."""
    from helpers.flows import make_flow

    flow = make_flow(tmp_path, "moody", None)
    (flow / "echo.py").write_text(MOODY_PY)
    (flow / "data.jsonl").write_text('{"x": "a"}\n{"x": "b"}\n{"x": "c"}\n')
    first = fs.json("run", "create", "--flow", "moody", "--data", "moody/data.jsonl",
                    "--column-mapping", "x=${data.x}", "--name", "moody1", "--stream",
                    "--instance-type", "small", "--environment-variables", "MODE=broken")
    assert (first["status"], first["completed"], first["failed"]) == ("Completed", 2, 1), first
    shown = fs.json("session", "show", "moody")
    assert "small" in json.dumps(shown), shown
    proc = fs("run", "create", "--flow", "moody", "--data", "moody/data.jsonl",
              "--column-mapping", "x=${data.x}", "--instance-type", "medium", "--stream",
              "--json")
    assert proc.returncode == 1, proc.stderr  # --stream: the exit says the run failed
    refused = json.loads(proc.stdout)  # and the run is printed all the same
    assert refused["status"] == "Failed" and refused["completed"] == 0, refused
    assert "runs with vm_size small, not medium" in proc.stderr, proc.stderr
    assert "runs with vm_size small, not medium" in refused["error"], refused
    resumed = fs.json("run", "create", "--resume-from", "moody1", "--name", "moody2",
                      "--stream", "--environment-variables", "MODE=fixed")
    assert (resumed["status"], resumed["completed"], resumed["failed"]) == ("Completed", 3, 0), \
        resumed
    rows = sorted((r["line_number"], r["y"]) for r in output_rows(settings, "moody2"))
    assert rows == [(0, "a:broken"), (1, "b:fixed"), (2, "c:broken")], rows  # a, c kept


def test_a_variant_run_from_the_shell_and_a_running_run_canceled(fs, tmp_path, settings):
    """`--variant ${labeled.variant_1}` runs that variant on every line; `run cancel` on a run
    still running ends it Canceled, keeping the lines it finished."""
    flow_copy(tmp_path, "variants")
    b = fs.json("run", "create", "--flow", "variants", "--data", "variants/data.jsonl",
                "--column-mapping", "text=${data.text}", "--variant", "${labeled.variant_1}",
                "--name", "vb", "--stream")
    assert b["status"] == "Completed", b
    outs = [r["out"] for r in sorted(output_rows(settings, "vb"), key=lambda r: r["line_number"])]
    assert outs and all(o.startswith("B:") for o in outs), outs

    flow_copy(tmp_path, "sleepy")
    (tmp_path / "long.jsonl").write_text('{"seconds": "0.2"}\n' + '{"seconds": "60"}\n' * 4)
    fs.json("run", "create", "--flow", "sleepy", "--data", "long.jsonl", "--name", "long",
            "--detach")
    records = RunRecords(open_store(settings.db_url))
    deadline = time.monotonic() + 120
    while records.find("long").status != "Running" or not records.find("long").completed:
        assert time.monotonic() < deadline, records.find("long")
        fs.ok("run", "show", "long")  # the server collects what the session finished
        time.sleep(0.5)
    canceled = fs.ok("run", "cancel", "long")
    assert "long" in canceled.stdout, canceled.stdout
    deadline = time.monotonic() + 60
    while (run := fs.json("run", "show", "long"))["status"] not in ("Canceled", "Completed"):
        assert time.monotonic() < deadline, run
        time.sleep(0.5)
    assert run["status"] == "Canceled" and run["completed"] >= 1, run
    assert run["completed"] < 5, run


def test_a_run_yml_with_unknown_fields_runs_and_names_what_it_ignored(fs, tmp_path, settings):
    flow_copy(tmp_path, "echo")
    fs.flows.append("echo")  # its session is stopped afterwards (the flow is named in run.yml)
    (tmp_path / "run.yml").write_text(
        "flow: echo\ndata: echo/data.jsonl\ncolumn_mapping:\n  text: ${data.text}\n"
        "name: from_yml\nfancy_option: 3\nresources:\n  instance_type: small\n  gpus: 2\n")
    made = fs.ok("run", "create", "--file", "run.yml", "--stream")
    assert "ignoring unknown field(s) fancy_option" in made.stderr, made.stderr
    assert "gpus" in made.stderr, made.stderr
    run = fs.json("run", "show", "from_yml")
    assert run["status"] == "Completed" and run["failed"] == 0, run


def test_runs_on_a_compute_instance_and_as_a_managed_identity(fs, tmp_path, settings):
    """`run create --compute box`: the run's session is on the instance; `--identity team`:
    the run's (serverless) session holds that identity; both at once is refused, naming
    --identity (an instance's sessions run as the instance's identity), not run as another."""
    from helpers.flows import make_flow

    for name in ("boxed", "teamed", "both"):
        make_flow(tmp_path, name, None)
        (tmp_path / name / "data.jsonl").write_text('{"x": "a"}\n{"x": "b"}\n')
    box = fs.json("compute", "create", "box", "--size", "small")
    fs.json("identity", "create", "team")

    def run(flow: str, *options: str, exit: int = 0) -> tuple[dict, dict]:
        proc = fs("run", "create", "--flow", flow, "--data", f"{flow}/data.jsonl",
                  "--column-mapping", "x=${data.x}", "--name", f"{flow}1", "--stream",
                  "--json", *options)
        assert proc.returncode == exit, proc.stderr
        return json.loads(proc.stdout), fs.json("run", "show", f"{flow}1")

    try:
        made, shown = run("boxed", "--compute", "box")
        assert (made["status"], made["completed"]) == ("Completed", 2), made
        assert shown["spec"]["resources"]["compute"] == "box", shown
        session = fs.json("session", "show", "boxed")
        assert session["id"] == shown["session_id"], (session, shown)
        assert (session["compute_type"], session["compute_id"]) == ("instance", box["id"])
        assert fs.json("compute", "show", "box")["sessions"] == 1

        made, shown = run("teamed", "--identity", "team")
        assert (made["status"], made["completed"]) == ("Completed", 2), made
        session = fs.json("session", "show", "teamed")
        assert (session["id"], session["identity"]) == (shown["session_id"], "team"), session

        made, shown = run("both", "--compute", "box", "--identity", "team", exit=1)
        assert (made["status"], made["completed"]) == ("Failed", 0), made
        assert "--identity" in made["error"] and "instance's" in made["error"], made
    finally:
        for flow in ("boxed", "teamed", "both"):
            fs("session", "stop", flow)
        fs("compute", "stop", "box")
        fs("compute", "delete", "box")

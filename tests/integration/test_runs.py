"""Batch runs through ``RunService``, for real: sessions as sandboxed supervisors on this
machine, batch workers forked from them, the flows of ``tests/flows``, results collected into
each run's folder. What is asserted is what a user sees: outputs.jsonl rows, details, metrics,
the summary, the errors; and, for the faults, that nothing is lost or stored twice."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from helpers.backends import stop_everything
from helpers.flows import SLOW_YAML, run
from helpers.openai_endpoint import OpenAIEndpoint

from flowsession.backends.compute import procs
from flowsession.backends.compute.local import LocalBackend
from flowsession.computes.service import ComputeService
from flowsession.environments.service import EnvironmentService
from flowsession.errors import Conflict, FlowSessionError, InvalidInput, LineFailed, NotFound
from flowsession.runs import records as R
from flowsession.runs.service import RunService
from flowsession.runs.spec import RunSpec
from flowsession.sessions.service import SessionService
from flowsession.store import open_store
from flowsession.worker.batchworker import read_records

USER = "ada"
FLOWS = Path(__file__).resolve().parents[1] / "flows"
pytestmark = pytest.mark.timeout(300)


# --- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture
def run_settings(settings):
    return replace(settings, idle_timeout_s=600)  # the default standby pool (1)


def make_runs(settings) -> RunService:
    store = open_store(settings.db_url)
    backend = LocalBackend(settings)
    sessions = SessionService(settings, store, envs=EnvironmentService(settings, store),
                              computes=ComputeService(settings, store, backend), backend=backend)
    return RunService.open(settings, sessions=sessions)


@pytest.fixture
def rs(run_settings):
    svc = make_runs(run_settings)
    yield svc
    run(stop_everything(svc.sessions))


def flow_copy(tmp_path: Path, name: str, as_name: str | None = None) -> Path:
    """A private copy of a test flow (its own session; free to edit)."""
    return Path(shutil.copytree(FLOWS / name, tmp_path / (as_name or name)))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def go(rs: RunService, *, timeout: float = 180, **spec) -> R.Run:
    """Create a run and wait for it to end."""
    created = run(rs.create(RunSpec(**spec), user=USER))
    ended = run(rs.wait(created.name, user=USER, timeout=timeout))
    assert ended.status in R.ENDED, f"{ended.name} still {ended.status}: {ended.summary()}"
    return ended


def outs(rs: RunService, name: str) -> list[dict]:
    return rs.outputs(name, user=USER)


def stored_positions(rs: RunService, name: str) -> list[int]:
    """The position of every record in the run's lines.jsonl (duplicates kept)."""
    path = rs.files(name).root / "lines.jsonl"
    if not path.exists():
        return []
    return [json.loads(raw)["i"] for raw in path.read_text().splitlines()]


def files_containing(roots: list[Path], needle: str) -> list[Path]:
    """Every file under ``roots`` holding ``needle`` (as UTF-8 bytes)."""
    found = []
    data = needle.encode()
    for root in roots:
        if not root.exists():
            continue
        for path in root.rglob("*"):
            try:
                if path.is_file() and not path.is_symlink() and data in path.read_bytes():
                    found.append(path)
            except OSError:
                continue
    return found


def wait_until(predicate, timeout: float = 60.0, step: float = 0.1, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(step)


# A flow whose lines take a while: it notes each execution in its working directory (the
# session's private work dir), then answers with the line's text and a mark of the session that
# ran it (an id made once per working directory).
SLOW_TOOL = '''import os
import time
import uuid

from promptflow.core import tool


def _session_mark() -> str:
    if not os.path.exists("session.id"):
        tmp = f".id.{uuid.uuid4().hex}"
        with open(tmp, "w") as f:
            f.write(uuid.uuid4().hex[:8])
        try:
            os.link(tmp, "session.id")  # atomic: the first one wins, whole
        except FileExistsError:
            pass
        os.unlink(tmp)
    with open("session.id") as f:
        return f.read()


@tool
def slow(text: str, seconds: str) -> str:
    with open("executions.log", "a") as f:
        f.write(text + "\\n")
    time.sleep(float(seconds))
    return f"{text}@{_session_mark()}"
'''


def slow_flow(tmp_path: Path, n: int, seconds: float, name: str = "slow") -> tuple[Path, Path]:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "flow.dag.yaml").write_text(SLOW_YAML)
    (folder / "slow.py").write_text(SLOW_TOOL)
    data = write_jsonl(tmp_path / f"{name}.jsonl",
                       [{"text": f"l{i}", "seconds": str(seconds)} for i in range(n)])
    return folder, data


def executions(rs: RunService, session_id: str) -> list[str]:
    """The lines the session's workers started, from its work dir (see SLOW_TOOL)."""
    handle = rs.sessions.records.get(session_id).session_handle
    path = Path(handle.slot) / "work" / "executions.log"
    return path.read_text().split() if path.exists() else []


def _nspid(pid: int) -> int:
    """The pid as the process sees itself (inside the sandbox's pid namespace)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    return pid


def batch_worker_pids(rs: RunService, name: str) -> dict[int, int]:
    """Host pid -> namespace pid of the run's batch workers (those with a results file)."""
    run_ = rs.get(name, user=USER)
    handle = rs.sessions.records.get(run_.session_id).session_handle
    run_dir = Path(handle.slot) / "state" / "runs" / name
    ns_pids = {int(p.name.split(".")[1]) for p in run_dir.glob("results.*.jsonl")
               if p.name.split(".")[1].isdigit()}
    found = {}
    for pid in rs.backend.process_tree(handle):
        try:
            ns = _nspid(pid)
        except OSError:
            continue
        if ns in ns_pids:
            found[pid] = ns
    return found


def supervisor_pid(rs: RunService, session_id: str) -> int:
    """The supervisor's host pid (under bubblewrap, a child of the sandbox's processes)."""
    handle = rs.sessions.records.get(session_id).session_handle
    tree = [handle.pid, *rs.backend.process_tree(handle)]

    def cmd(pid: int) -> str:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return ""

    def parent(pid: int) -> int:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])

    sups = [p for p in tree if "flowsession.worker.supervisor" in cmd(p)
            and "bwrap" not in cmd(p).split("\0")[0]]
    top = [p for p in sups if parent(p) not in sups]  # forked workers share its cmdline
    assert len(top) == 1, (tree, sups)
    return top[0]


# --- data, mapping, order ---------------------------------------------------------------------


def test_an_echo_run_gives_every_line_its_output_in_order(rs, tmp_path):
    flow = flow_copy(tmp_path, "echo")
    done = go(rs, flow=str(flow), data=str(flow / "data.jsonl"))

    assert done.status == R.RunStatus.COMPLETED and done.error is None
    assert (done.total, done.completed, done.failed) == (4, 4, 0)
    assert done.summary() == "4 of 4 line(s) completed"
    assert outs(rs, done.name) == [
        {"line_number": 0, "out": "hello"}, {"line_number": 1, "out": "prompt flow"},
        {"line_number": 2, "out": "Grüße, 世界"}, {"line_number": 3, "out": ""}]
    # outputs.jsonl as a file, byte for byte what a user reads (UTF-8, not escaped)
    text = (rs.files(done.name).root / "outputs.jsonl").read_text(encoding="utf-8")
    assert "Grüße, 世界" in text and len(text.splitlines()) == 4
    details = rs.details(done.name, user=USER)
    assert [(d["line_number"], d["status"], d["inputs"], d["outputs"]) for d in details] == [
        (0, "Completed", {"text": "hello"}, {"out": "hello"}),
        (1, "Completed", {"text": "prompt flow"}, {"out": "prompt flow"}),
        (2, "Completed", {"text": "Grüße, 世界"}, {"out": "Grüße, 世界"}),
        (3, "Completed", {"text": ""}, {"out": ""})]
    assert all(d["error"] is None and d["duration"] >= 0 for d in details)
    assert rs.metrics(done.name, user=USER) == {}
    assert done.started_at and done.ended_at and done.ended_at >= done.started_at


def test_column_mapping_a_literal_and_csv_data(rs, tmp_path):
    flow = flow_copy(tmp_path, "echo")
    data = write_jsonl(tmp_path / "q.jsonl", [{"q": f"question {i}", "text": f"t{i}"}
                                              for i in range(5)])
    by_column = go(rs, flow=str(flow), data=str(data), column_mapping={"text": "${data.q}"})
    assert outs(rs, by_column.name) == [{"line_number": i, "out": f"question {i}"}
                                        for i in range(5)]

    literal = go(rs, flow=str(flow), data=str(data), column_mapping={"text": "same for all"})
    assert outs(rs, literal.name) == [{"line_number": i, "out": "same for all"}
                                      for i in range(5)]

    by_name = go(rs, flow=str(flow), data=str(data))  # no mapping: the column named 'text'
    assert [o["out"] for o in outs(rs, by_name.name)] == [f"t{i}" for i in range(5)]

    csv = tmp_path / "d.csv"
    csv.write_text('text,other\n"a, with comma",1\nplain,2\n"multi\nline",3\n',
                   encoding="utf-8")
    from_csv = go(rs, flow=str(flow), data=str(csv))
    assert outs(rs, from_csv.name) == [{"line_number": 0, "out": "a, with comma"},
                                       {"line_number": 1, "out": "plain"},
                                       {"line_number": 2, "out": "multi\nline"}]
    js = tmp_path / "d.json"
    js.write_text(json.dumps([{"text": "from json"}, {"text": "two"}]))
    from_json = go(rs, flow=str(flow), data=str(js))
    assert [o["out"] for o in outs(rs, from_json.name)] == ["from json", "two"]

    folder = tmp_path / "parts"
    folder.mkdir()
    write_jsonl(folder / "b.jsonl", [{"text": "b1"}])
    write_jsonl(folder / "a.jsonl", [{"text": "a1"}, {"text": "a2"}])
    from_folder = go(rs, flow=str(flow), data=str(folder))
    assert outs(rs, from_folder.name) == [{"line_number": 0, "out": "a1"},
                                          {"line_number": 1, "out": "a2"},
                                          {"line_number": 2, "out": "b1"}]
    # six runs of one flow: one session
    assert len({r.session_id for r in rs.list(user=USER)}) == 1


def test_a_few_thousand_lines_keep_their_order_and_each_is_stored_once(rs, tmp_path):
    flow = flow_copy(tmp_path, "echo")
    n = 3000
    data = write_jsonl(tmp_path / "big.jsonl", [{"text": f"line {i}"} for i in range(n)])
    done = go(rs, flow=str(flow), data=str(data))
    assert (done.status, done.total, done.completed) == (R.RunStatus.COMPLETED, n, n)
    assert outs(rs, done.name) == [{"line_number": i, "out": f"line {i}"} for i in range(n)]
    assert sorted(stored_positions(rs, done.name)) == list(range(n))


# --- evaluation runs over a base run; metrics -------------------------------------------


def test_an_evaluation_run_joins_the_base_run_by_line_number_and_logs_metrics(rs, tmp_path):
    echo = flow_copy(tmp_path, "echo")
    agg = flow_copy(tmp_path, "aggregate")
    base = go(rs, flow=str(echo), data=str(echo / "data.jsonl"))
    expected = write_jsonl(tmp_path / "expected.jsonl", [
        {"expected": "hello"}, {"expected": "PROMPT FLOW"}, {"expected": "nope"},
        {"expected": ""}])
    ev = go(rs, flow=str(agg), data=str(expected), run=base.name,
            column_mapping={"answer": "${run.outputs.out}", "expected": "${data.expected}"})
    assert ev.status == R.RunStatus.COMPLETED, ev.error
    assert outs(rs, ev.name) == [{"line_number": 0, "grade": "correct"},
                                 {"line_number": 1, "grade": "correct"},
                                 {"line_number": 2, "grade": "wrong"},
                                 {"line_number": 3, "grade": "correct"}]
    assert rs.metrics(ev.name, user=USER) == {"accuracy": 0.75}
    details = rs.details(ev.name, user=USER)
    assert details[1]["inputs"] == {"answer": "prompt flow", "expected": "PROMPT FLOW"}

    # the flow's own data: the README's 0.75
    own = go(rs, flow=str(agg), data=str(agg / "data.jsonl"))
    assert [o["grade"] for o in outs(rs, own.name)] == ["correct", "correct", "wrong", "correct"]
    assert rs.metrics(own.name, user=USER) == {"accuracy": 0.75}


def test_an_evaluation_drops_the_lines_that_failed_in_the_base_run(rs, tmp_path):
    raises = flow_copy(tmp_path, "raises")
    agg = flow_copy(tmp_path, "aggregate")
    base = go(rs, flow=str(raises), data=str(raises / "data.jsonl"))
    assert (base.status, base.completed, base.failed) == (R.RunStatus.COMPLETED, 2, 2)

    # no data: the base run's lines, with its inputs and outputs
    ev = go(rs, flow=str(agg), run=base.name,
            column_mapping={"answer": "${run.outputs.out}", "expected": "${run.inputs.text}"})
    assert ev.status == R.RunStatus.COMPLETED, ev.error
    assert ev.total == 2
    assert outs(rs, ev.name) == [{"line_number": 0, "grade": "correct"},
                                 {"line_number": 2, "grade": "correct"}]
    assert [d["line_number"] for d in rs.details(ev.name, user=USER)] == [0, 2]
    assert rs.metrics(ev.name, user=USER) == {"accuracy": 1.0}


# --- failed lines; resume ----------------------------------------------------------------------


def test_failed_lines_do_not_fail_the_run_and_resume_reruns_only_them(rs, tmp_path):
    flow = flow_copy(tmp_path, "raises")
    (flow / "check.py").write_text(
        "import os\n\nfrom promptflow.core import tool\n\n\n@tool\n"
        "def check(text: str) -> str:\n"
        "    attempt = os.environ.get('ATTEMPT', '?')\n"
        "    with open('executions.log', 'a') as f:\n"
        "        f.write(text.replace(' ', '_') + '\\n')\n"
        "    if text.startswith('bad') and attempt == '1':\n"
        "        raise ValueError(f'bad input: {text}')\n"
        "    return f'{text}#{attempt}'\n")
    first = go(rs, flow=str(flow), data=str(flow / "data.jsonl"),
               environment_variables={"ATTEMPT": "1"})
    assert first.status == R.RunStatus.COMPLETED and first.error is None
    assert (first.completed, first.failed) == (2, 2)
    assert first.summary() == "2 of 4 line(s) completed, 2 of 4 failed"
    assert [e[0] for e in first.errors] == [1, 3]
    assert "bad input: bad apple" in first.errors[0][1]
    details = rs.details(first.name, user=USER)
    assert [d["status"] for d in details] == ["Completed", "Failed", "Completed", "Failed"]
    assert details[1]["error"] == "Execution failure in 'check': (ValueError) bad input: bad apple"
    assert details[3]["error"] == "Execution failure in 'check': (ValueError) bad input: bad"
    assert details[1]["outputs"] is None
    assert outs(rs, first.name) == [{"line_number": 0, "out": "good one#1"},
                                    {"line_number": 2, "out": "fine#1"}]

    again = go(rs, resume_from=first.name, environment_variables={"ATTEMPT": "2"})
    assert again.name != first.name and again.status == R.RunStatus.COMPLETED, again.error
    assert (again.total, again.completed, again.failed) == (4, 4, 0)
    # the completed lines were kept from the first run (#1), the failed ones ran again (#2)
    assert outs(rs, again.name) == [{"line_number": 0, "out": "good one#1"},
                                    {"line_number": 1, "out": "bad apple#2"},
                                    {"line_number": 2, "out": "fine#1"},
                                    {"line_number": 3, "out": "bad#2"}]
    assert sorted(stored_positions(rs, again.name)) == [0, 1, 2, 3]
    # ... and were not executed again: 4 executions, then 2
    ran = executions(rs, again.session_id)
    assert sorted(ran) == sorted(["good_one", "bad_apple", "fine", "bad", "bad_apple", "bad"])
    assert first.session_id == again.session_id
    # the first run is untouched
    assert rs.get(first.name, user=USER).failed == 2


def test_a_failing_aggregation_fails_the_run_and_keeps_the_line_outputs(rs, tmp_path):
    agg = flow_copy(tmp_path, "aggregate")
    (agg / "accuracy.py").write_text(
        "from typing import List\n\nfrom promptflow.core import tool\n\n\n@tool\n"
        "def accuracy(grades: List[str]) -> float:\n"
        "    raise RuntimeError('no metrics today')\n")
    r = go(rs, flow=str(agg), data=str(agg / "data.jsonl"))
    assert r.status == R.RunStatus.FAILED
    assert r.error.startswith("the aggregation failed: ") and "no metrics today" in r.error
    assert [o["grade"] for o in outs(rs, r.name)] == ["correct", "correct", "wrong", "correct"]
    assert rs.metrics(r.name, user=USER) == {}


# --- variants --------------------------------------------------------------------------------


def test_a_variant_run_and_an_unknown_variant(rs, tmp_path):
    flow = flow_copy(tmp_path, "variants")
    with pytest.raises(InvalidInput) as bad:
        run(rs.create(RunSpec(flow=str(flow), data=str(flow / "data.jsonl"),
                              variant="${labeled.variant_9}"), user=USER))
    assert "variant_9" in bad.value.message and "variant_0, variant_1" in bad.value.hint
    with pytest.raises(InvalidInput) as no_node:
        run(rs.create(RunSpec(flow=str(flow), data=str(flow / "data.jsonl"),
                              variant="${nosuch.variant_1}"), user=USER))
    assert "'nosuch'" in no_node.value.message and "labeled" in no_node.value.hint
    with pytest.raises(InvalidInput):
        run(rs.create(RunSpec(flow=str(flow), data=str(flow / "data.jsonl"),
                              variant="labeled.variant_1"), user=USER))
    # nothing ran: no run, no session
    assert rs.list(user=USER) == []
    assert rs.sessions.records.list(owner=None) == []

    b = go(rs, flow=str(flow), data=str(flow / "data.jsonl"), variant="${labeled.variant_1}")
    assert outs(rs, b.name) == [{"line_number": 0, "out": "B:one"},
                                {"line_number": 1, "out": "B:two"},
                                {"line_number": 2, "out": "B:three"}]
    default = go(rs, flow=str(flow), data=str(flow / "data.jsonl"))
    assert [o["out"] for o in outs(rs, default.name)] == ["A:one", "A:two", "A:three"]
    # the flow's own file is unchanged
    assert "default_variant_id: variant_0" in (flow / "flow.dag.yaml").read_text()


# --- flex flows, generators, conditional nodes -------------------------------------------------


def test_flex_function_generator_and_conditional_flows(rs, tmp_path):
    ff = flow_copy(tmp_path, "flex_func")
    r = go(rs, flow=str(ff), data=str(ff / "data.jsonl"))
    assert outs(rs, r.name) == [{"line_number": 0, "out": "HELLO"},
                                {"line_number": 1, "out": "PROMPT FLOW"},
                                {"line_number": 2, "out": "MIXED 123"}]

    gen = flow_copy(tmp_path, "generator")
    r = go(rs, flow=str(gen), data=str(gen / "data.jsonl"))
    assert outs(rs, r.name) == [{"line_number": 0, "answer": "one two three "},
                                {"line_number": 1, "answer": "streaming is fun "},
                                {"line_number": 2, "answer": "single "}]

    cond = flow_copy(tmp_path, "conditional")
    r = go(rs, flow=str(cond), data=str(cond / "data.jsonl"))
    assert (r.completed, r.failed) == (4, 0)
    assert outs(rs, r.name) == [
        {"line_number": 0, "result": "a:HELLO", "branch_a": "HELLO"},
        {"line_number": 1, "result": "b:olleh", "branch_a": None},
        {"line_number": 2, "result": None, "branch_a": None},
        {"line_number": 3, "result": "a:FLOW", "branch_a": "FLOW"}]


def test_a_flex_class_flow_gets_its_init_arguments(rs, tmp_path):
    fc = flow_copy(tmp_path, "flex_class")
    r = go(rs, flow=str(fc), data=str(fc / "data.jsonl"), init={"prefix": ">"})
    assert r.status == R.RunStatus.COMPLETED, r.error
    assert outs(rs, r.name) == [{"line_number": 0, "out": ">alpha"},
                                {"line_number": 1, "out": ">beta"},
                                {"line_number": 2, "out": ">gamma"}]


def test_a_flex_class_flow_without_its_init_fails_with_the_reason(rs, tmp_path):
    fc = flow_copy(tmp_path, "flex_class")
    try:  # refused at once, or failed when its workers load the flow: either way, why
        go(rs, flow=str(fc), data=str(fc / "data.jsonl"))
    except FlowSessionError as exc:
        assert "prefix" in exc.message
    [failed] = rs.list(user=USER)
    assert failed.status == R.RunStatus.FAILED and "prefix" in failed.error


# --- connections ---------------------------------------------------------------------------


class TwoKeyServer(OpenAIEndpoint):
    """Accepts several keys; ``requests`` says which one each call used."""

    def __init__(self, keys: list[str]):
        super().__init__(api_key=keys[0], retry_after=0)
        self.keys = keys

    def _authorized(self, authorization, api_key_header, *, azure):
        return any(authorization == f"Bearer {k}" for k in self.keys)


KEY_A = "sk-run-key-A-1f2e3d4c5b6a"
KEY_B = "sk-run-key-B-9a8b7c6d5e4f"


def test_an_llm_flow_uses_the_connection_and_its_key_is_stored_nowhere(rs, tmp_path,
                                                                         run_settings):
    flow = flow_copy(tmp_path, "llm_chat")
    with TwoKeyServer([KEY_A, KEY_B]) as server:
        rs.connections.create({"name": "open_ai_connection", "type": "open_ai",
                               "api_key": KEY_A, "base_url": server.base_url}, owner=USER)
        rs.connections.create({"name": "second", "type": "open_ai",
                               "api_key": KEY_B, "base_url": server.base_url}, owner=USER)
        r = go(rs, flow=str(flow), data=str(flow / "data.jsonl"))
        assert r.status == R.RunStatus.COMPLETED, r.error
        assert outs(rs, r.name) == [
            {"line_number": 0, "answer": "echo: What is the capital of France?"},
            {"line_number": 1, "answer": "echo: How many legs does a spider have?"},
            {"line_number": 2, "answer": "echo: Name a prime number greater than 10."}]
        calls = [q for q in server.requests if q["path"] == "/v1/chat/completions"]
        assert len(calls) == 3
        assert {q["authorization"] for q in calls} == {f"Bearer {KEY_A}"}
        assert all(q["body"]["model"] == "gpt-4o-mini" for q in calls)

        server.clear()
        over = go(rs, flow=str(flow), data=str(flow / "data.jsonl"),
                  connections={"chat": {"connection": "second"}})
        assert over.status == R.RunStatus.COMPLETED, over.error
        assert [o["answer"] for o in outs(rs, over.name)][0] == \
            "echo: What is the capital of France?"
        calls = [q for q in server.requests if q["path"] == "/v1/chat/completions"]
        assert len(calls) == 3 and {q["authorization"] for q in calls} == {f"Bearer {KEY_B}"}

    roots = [run_settings.home, run_settings.runtime_dir]
    for key in (KEY_A, KEY_B):
        assert files_containing(roots, key) == []


def test_flow_test_of_an_llm_flow_and_of_a_flex_class_uses_connections_and_init(rs,
                                                                                   tmp_path):
    """A session's own test lines load the flow with the owner's connections (as they are at
    each test) and, for a flex class, the init given to the test."""
    llm, flex = flow_copy(tmp_path, "llm_chat"), flow_copy(tmp_path, "flex_class")
    with TwoKeyServer([KEY_A, KEY_B]) as server:
        rs.connections.create({"name": "open_ai_connection", "type": "open_ai",
                               "api_key": KEY_A, "base_url": server.base_url}, owner=USER)
        out = asyncio.run(rs.sessions.test(llm, {"question": "hi"}, user=USER))
        assert out == {"answer": "echo: hi"}
        rs.connections.create({"name": "open_ai_connection", "type": "open_ai",
                               "api_key": KEY_B, "base_url": server.base_url}, owner=USER)
        asyncio.run(rs.sessions.test(llm, {"question": "again"}, user=USER))
        keys = [q["authorization"] for q in server.requests
                if q["path"] == "/v1/chat/completions"]
        assert keys == [f"Bearer {KEY_A}", f"Bearer {KEY_B}"]  # the key as it is now
    with pytest.raises(LineFailed, match="prefix"):
        asyncio.run(rs.sessions.test(flex, {"text": "x"}, user=USER))
    out = asyncio.run(rs.sessions.test(flex, {"text": "x"}, user=USER, init={"prefix": ">"}))
    assert out == {"out": ">x"}
    asyncio.run(stop_everything(rs.sessions))


def test_a_missing_connection_is_refused_before_anything_runs(rs, tmp_path):
    flow = flow_copy(tmp_path, "llm_chat")
    data = str(flow / "data.jsonl")
    with pytest.raises(NotFound) as missing:  # the llm node's own connection
        run(rs.create(RunSpec(flow=str(flow), data=data), user=USER))
    assert "open_ai_connection" in missing.value.message
    rs.connections.create({"name": "open_ai_connection", "type": "open_ai",
                           "api_key": KEY_A, "base_url": "http://127.0.0.1:9/v1"}, owner=USER)
    with pytest.raises(InvalidInput) as bad_node:
        run(rs.create(RunSpec(flow=str(flow), data=data,
                              connections={"nosuch": {"connection": "x"}}), user=USER))
    assert "nosuch" in bad_node.value.message and "chat" in bad_node.value.hint
    with pytest.raises(NotFound) as missing:
        run(rs.create(RunSpec(flow=str(flow), data=data,
                              connections={"chat": {"connection": "missing_conn"}}), user=USER))
    assert "missing_conn" in missing.value.message
    # another user's connection of that name is not theirs to use
    rs.connections.create({"name": "graces", "type": "open_ai", "api_key": KEY_B},
                          owner="grace")
    with pytest.raises(NotFound):
        run(rs.create(RunSpec(flow=str(flow), data=data,
                              connections={"chat": {"connection": "graces"}}), user=USER))
    assert rs.list(user=USER) == [] and rs.sessions.records.list(owner=None) == []


def test_a_tool_with_a_custom_connection(rs, tmp_path, run_settings):
    flow = flow_copy(tmp_path, "connection_tool")
    secret = "custom-s3cret-7e6d5c4b"
    rs.connections.create({"name": "my_custom", "type": "custom",
                           "configs": {"greeting": "Hello"}, "secrets": {"api_key": secret}},
                          owner=USER)
    r = go(rs, flow=str(flow), data=str(flow / "data.jsonl"))
    assert r.status == R.RunStatus.COMPLETED, r.error
    assert outs(rs, r.name) == [{"line_number": 0, "out": "Hello world"},
                                {"line_number": 1, "out": "Hello Ada"},
                                {"line_number": 2, "out": "Hello batch"}]
    assert files_containing([run_settings.home, run_settings.runtime_dir], secret) == []


# --- environment variables ---------------------------------------------------------------------


def test_environment_variables_reach_the_tool_and_are_not_stored_in_clear(rs, tmp_path,
                                                                          run_settings):
    flow = flow_copy(tmp_path, "echo", "envflow")
    (flow / "echo.py").write_text(
        "import hashlib\nimport os\n\nfrom promptflow.core import tool\n\n\n@tool\n"
        "def echo(text: str) -> str:\n"
        "    value = os.environ.get(text)\n"
        "    return 'unset' if value is None else hashlib.sha256(value.encode()).hexdigest()\n")
    token = "tok-env-3c2b1a0f9e8d"
    data = write_jsonl(tmp_path / "names.jsonl", [{"text": "RUN_TOKEN"}, {"text": "NOT_SET"}])
    r = go(rs, flow=str(flow), data=str(data), environment_variables={"RUN_TOKEN": token})
    assert outs(rs, r.name) == [
        {"line_number": 0, "out": hashlib.sha256(token.encode()).hexdigest()},
        {"line_number": 1, "out": "unset"}]
    assert r.spec["environment_variables"] == ["RUN_TOKEN"]  # the names, not the values
    assert files_containing([run_settings.home, run_settings.runtime_dir], token) == []

    # the session's own test workers never see a run's environment
    assert run(rs.sessions.test(flow, {"text": "RUN_TOKEN"}, user=USER)) == {"out": "unset"}


# --- faults in the data and the mapping -------------------------------------------------------


def test_bad_data_is_refused_naming_the_file_and_line(rs, tmp_path):
    flow = flow_copy(tmp_path, "echo")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok 1"}\n{"text": "ok 2"}\n{"text": oops}\n{"text": "ok 4"}\n')

    with pytest.raises(InvalidInput) as exc:
        run(rs.create(RunSpec(flow=str(flow), data=str(bad)), user=USER))
    assert str(bad) in exc.value.message and "line 3" in exc.value.message
    assert "column" in exc.value.message and "--skip-malformed" in exc.value.hint

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(InvalidInput) as exc:
        run(rs.create(RunSpec(flow=str(flow), data=str(empty)), user=USER))
    assert str(empty) in exc.value.message and "no lines" in exc.value.message

    missing = tmp_path / "nope.jsonl"
    with pytest.raises(InvalidInput) as exc:
        run(rs.create(RunSpec(flow=str(flow), data=str(missing)), user=USER))
    assert str(missing) in exc.value.message and "does not exist" in exc.value.message

    with pytest.raises(InvalidInput) as exc:
        run(rs.create(RunSpec(flow=str(flow), data=str(flow / "data.jsonl"),
                              column_mapping={"text": "${data.question}"}), user=USER))
    assert "'question'" in exc.value.message and "'text'" in exc.value.hint

    nothing = write_jsonl(tmp_path / "other.jsonl", [{"q": "x"}])
    with pytest.raises(InvalidInput) as exc:  # no column 'text', no mapping
        run(rs.create(RunSpec(flow=str(flow), data=str(nothing)), user=USER))
    assert "'text'" in exc.value.message

    with pytest.raises(NotFound) as exc:
        run(rs.create(RunSpec(flow=str(flow), run="no_such_run",
                              column_mapping={"text": "${run.outputs.out}"}), user=USER))
    assert "no_such_run" in exc.value.message

    # none of these left a run record behind, or started a session
    assert rs.list(user=USER) == []
    assert rs.sessions.records.list(owner=None) == []

    skipped = go(rs, flow=str(flow), data=str(bad), skip_malformed=True)
    assert skipped.status == R.RunStatus.COMPLETED
    assert outs(rs, skipped.name) == [{"line_number": 0, "out": "ok 1"},
                                      {"line_number": 1, "out": "ok 2"},
                                      {"line_number": 2, "out": "ok 4"}]


def test_a_run_named_twice_and_a_bad_name(rs, tmp_path):
    flow = flow_copy(tmp_path, "echo")
    go(rs, flow=str(flow), data=str(flow / "data.jsonl"), name="mine")
    with pytest.raises(Conflict):
        run(rs.create(RunSpec(flow=str(flow), data=str(flow / "data.jsonl"), name="mine"),
                      user=USER))
    with pytest.raises(InvalidInput):
        run(rs.create(RunSpec(flow=str(flow), data=str(flow / "data.jsonl"),
                              name="../escape"), user=USER))
    assert [r.name for r in rs.list(user=USER)] == ["mine"]
    assert rs.get("mine", user=USER).status == R.RunStatus.COMPLETED
    # another user does not see it
    with pytest.raises(NotFound):
        rs.get("mine", user="grace")


# --- a line that hangs ------------------------------------------------------------------------


def test_a_line_over_its_timeout_fails_alone_and_the_others_complete(rs, tmp_path):
    flow = flow_copy(tmp_path, "sleepy")
    data = write_jsonl(tmp_path / "d.jsonl", [{"seconds": "0.1"}, {"seconds": "30"},
                                              {"seconds": "0"}, {"seconds": "0.2"},
                                              {"seconds": "0.1"}])
    r = go(rs, flow=str(flow), data=str(data), line_timeout=1, workers=1,
           max_concurrency=1)
    assert r.status == R.RunStatus.COMPLETED and (r.completed, r.failed) == (4, 1)
    details = rs.details(r.name, user=USER)
    assert [d["status"] for d in details] == ["Completed", "Failed", "Completed", "Completed",
                                              "Completed"]
    assert "timed out" in details[1]["error"] and "1 s" in details[1]["error"]
    assert outs(rs, r.name) == [{"line_number": 0, "slept": "0.1"},
                                {"line_number": 2, "slept": "0"},
                                {"line_number": 3, "slept": "0.2"},
                                {"line_number": 4, "slept": "0.1"}]
    assert sorted(stored_positions(rs, r.name)) == [0, 1, 2, 3, 4]


def test_a_line_that_kills_its_worker_fails_alone_after_three_tries(rs, tmp_path):
    flow = flow_copy(tmp_path, "echo")
    (flow / "echo.py").write_text(
        "import os\nimport signal\n\nfrom promptflow.core import tool\n\n\n@tool\n"
        "def echo(text: str) -> str:\n"
        "    with open('executions.log', 'a') as f:\n"
        "        f.write(text + '\\n')\n"
        "    if text == 'die':\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return text\n")
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in
                                              ["a", "die", "b", "c", "d", "e"]])
    r = go(rs, flow=str(flow), data=str(data), workers=2)
    assert r.status == R.RunStatus.COMPLETED and (r.completed, r.failed) == (5, 1)
    [[line, message]] = r.errors
    assert line == 1
    assert message == ("the worker running this line was killed by SIGKILL (3 times): "
                       "it is not tried again")
    assert [o["out"] for o in outs(rs, r.name)] == ["a", "b", "c", "d", "e"]
    assert sorted(stored_positions(rs, r.name)) == list(range(6))
    ran = executions(rs, r.session_id)
    # three times alone (blamed each time); once more first if it died among other lines in
    # flight (then nobody is blamed: they all run again, one at a time)
    assert ran.count("die") in (3, 4) and all(ran.count(t) in (1, 2) for t in "abcde"), ran


# --- a worker killed --------------------------------------------------------------------------


def test_a_batch_worker_killed_mid_run_loses_nothing_and_stores_nothing_twice(rs, tmp_path):
    flow, data = slow_flow(tmp_path, 16, 0.4)
    created = run(rs.create(RunSpec(flow=str(flow), data=str(data), workers=2,
                                    max_concurrency=2), user=USER))
    name = created.name

    def some_done() -> bool:
        return run(rs.advance(name, user=USER)).completed >= 2

    wait_until(some_done, 60, what="two lines done")
    workers = batch_worker_pids(rs, name)
    assert len(workers) == 2, workers
    victim = sorted(workers)[0]
    os.kill(victim, signal.SIGKILL)

    done = run(rs.wait(name, user=USER, timeout=120))
    assert done.status == R.RunStatus.COMPLETED, done.error
    assert (done.total, done.completed, done.failed) == (16, 16, 0)
    positions = stored_positions(rs, name)
    assert sorted(positions) == list(range(16))  # each line once
    assert [o["out"].split("@")[0] for o in outs(rs, name)] == [f"l{i}" for i in range(16)]
    ran = executions(rs, done.session_id)
    assert set(ran) == {f"l{i}" for i in range(16)}
    assert len(ran) <= 17, ran  # at most the line the killed worker was running, again
    log = (rs.files(name).root / "logs" / "run.log").read_text()
    assert "run completed" in log


# --- the session killed -----------------------------------------------------------------------


def test_a_session_killed_mid_run_is_replaced_and_only_missing_lines_run(rs, tmp_path):
    flow, data = slow_flow(tmp_path, 16, 0.4)
    created = run(rs.create(RunSpec(flow=str(flow), data=str(data), workers=2,
                                    max_concurrency=2), user=USER))
    name, first_session = created.name, created.session_id
    wait_until(lambda: run(rs.advance(name, user=USER)).completed >= 4, 60,
               what="four lines done")
    old_slot = Path(rs.sessions.records.get(first_session).session_handle.slot)
    os.kill(supervisor_pid(rs, first_session), signal.SIGKILL)
    handle = rs.sessions.records.get(first_session).session_handle
    wait_until(lambda: not procs.alive(handle.pid, handle.ref["pid_start"])
               and not procs.with_argument_under(str(old_slot)), 20,
               what="the session's processes to die")
    # what the dead session had stored: complete records in its workers' results files
    stored_old = {rec["i"] for path in (old_slot / "state" / "runs" / name).glob("results.*")
                  for rec in read_records(path)}
    assert stored_old, "the dead session stored nothing"

    done = run(rs.wait(name, user=USER, timeout=120))
    assert done.status == R.RunStatus.COMPLETED, done.error
    # the lost session was reset: a new supervisor in a new slot
    new_slot = Path(rs.sessions.records.get(done.session_id).session_handle.slot)
    assert new_slot != old_slot and not old_slot.exists()
    assert (done.total, done.completed, done.failed) == (16, 16, 0)
    assert sorted(stored_positions(rs, name)) == list(range(16))
    rows = outs(rs, name)
    assert [o["out"].split("@")[0] for o in rows] == [f"l{i}" for i in range(16)]
    # the new session ran exactly the lines without a stored result, each once
    ran_after = executions(rs, done.session_id)
    assert sorted(ran_after) == sorted(f"l{i}" for i in range(16) if i not in stored_old)
    # and the stored ones kept the dead session's answer
    old_mark = {rows[i]["out"].split("@")[1] for i in stored_old}
    new_mark = {rows[i]["out"].split("@")[1] for i in range(16) if i not in stored_old}
    assert len(old_mark) == 1 and len(new_mark) == 1 and old_mark != new_mark
    log = (rs.files(name).root / "logs" / "run.log").read_text()
    assert "resubmit" in log


def test_a_session_reset_mid_run_does_not_stop_the_run(rs, tmp_path):
    flow, data = slow_flow(tmp_path, 12, 0.4)
    created = run(rs.create(RunSpec(flow=str(flow), data=str(data), workers=2), user=USER))
    wait_until(lambda: run(rs.advance(created.name, user=USER)).completed >= 3, 60,
               what="three lines done")
    run(rs.sessions.reset(flow, user=USER))
    done = run(rs.wait(created.name, user=USER, timeout=120))
    assert done.status == R.RunStatus.COMPLETED and (done.completed, done.failed) == (12, 0)
    assert sorted(stored_positions(rs, created.name)) == list(range(12))
    assert [o["out"].split("@")[0] for o in outs(rs, created.name)] == \
        [f"l{i}" for i in range(12)]


# --- cancel -----------------------------------------------------------------------------------


def test_cancel_mid_run_keeps_the_lines_done_and_a_canceled_base_run_is_refused(rs, tmp_path):
    flow, data = slow_flow(tmp_path, 20, 0.4)
    echo = flow_copy(tmp_path, "echo")
    created = run(rs.create(RunSpec(flow=str(flow), data=str(data), workers=2,
                                    max_concurrency=2), user=USER))
    name = created.name
    assert created.status == R.RunStatus.RUNNING

    # a base run that is still running cannot be evaluated
    with pytest.raises(Conflict) as exc:
        run(rs.create(RunSpec(flow=str(echo), run=name,
                              column_mapping={"text": "${run.outputs.out}"}), user=USER))
    assert "Running" in exc.value.message and name in exc.value.message

    wait_until(lambda: run(rs.advance(name, user=USER)).completed >= 3, 60, what="3 lines")
    canceled = run(rs.cancel(name, user=USER))
    assert canceled.status == R.RunStatus.CANCELED
    assert 3 <= canceled.completed < 20
    rows = outs(rs, name)
    assert len(rows) == canceled.completed
    assert all(o["out"].startswith(f"l{o['line_number']}@") for o in rows)
    details = rs.details(name, user=USER)
    assert sum(d["status"] == "Completed" for d in details) == canceled.completed
    assert "NotStarted" in {d["status"] for d in details}
    # nothing more runs after the cancel; the session itself goes on serving
    ran = executions(rs, canceled.session_id)
    time.sleep(1.5)
    assert executions(rs, canceled.session_id) == ran
    assert rs.get(name, user=USER).completed == canceled.completed
    assert run(rs.sessions.test(flow, {"text": "t", "seconds": "0"}, user=USER))["out"] \
        .startswith("t@")
    with pytest.raises(Conflict):
        run(rs.cancel(name, user=USER))

    with pytest.raises(Conflict) as exc:
        run(rs.create(RunSpec(flow=str(echo), run=name,
                              column_mapping={"text": "${run.outputs.out}"}), user=USER))
    assert "Canceled" in exc.value.message
    # a canceled run can be resumed: only the rest runs
    rest = go(rs, resume_from=name)
    assert rest.status == R.RunStatus.COMPLETED and rest.completed == 20
    assert sorted(stored_positions(rs, rest.name)) == list(range(20))


# --- the control plane killed while preparing -----------------------------------------------------

DIE_AFTER_INPUTS = """
import asyncio, os, sys
from dataclasses import replace
from pathlib import Path
from flowsession.config import Settings
from flowsession.runs.files import RunFiles
from flowsession.runs.service import RunService
from flowsession.runs.spec import RunSpec

write = RunFiles.write_inputs
def write_then_die(self, lines):
    if sys.argv[3] == "after":
        write(self, lines)
    os._exit(9)  # the control plane dies right before / after storing the run's inputs
RunFiles.write_inputs = write_then_die
settings = replace(Settings.from_env(), standby_pool_size=0, idle_timeout_s=600)
svc = RunService.open(settings)
asyncio.run(svc.create(RunSpec(flow=sys.argv[1], data=sys.argv[2], name="prepared",
                               environment_variables={"RUN_TOKEN": "tok-prep"}), user="ada"))
"""


def test_a_run_whose_control_plane_died_while_preparing_runs_every_line(rs, tmp_path,
                                                                        run_settings):
    flow = flow_copy(tmp_path, "echo", "envflow")
    (flow / "echo.py").write_text(
        "import os\n\nfrom promptflow.core import tool\n\n\n@tool\n"
        "def echo(text: str) -> str:\n    return text + ':' + os.environ.get('RUN_TOKEN', '-')\n")
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": f"t{i}"} for i in range(5)])
    env = {**os.environ, "FLOWSESSION_HOME": str(run_settings.home),
           "FLOWSESSION_IMAGES_DIR": str(run_settings.images_dir),
           "FLOWSESSION_INDEX_URL": run_settings.index_url}
    died = subprocess.run([sys.executable, "-c", DIE_AFTER_INPUTS, str(flow), str(data),
                           "after"], env=env, capture_output=True, text=True, timeout=120)
    assert died.returncode == 9, died.stderr
    assert rs.get("prepared", user=USER).status == R.RunStatus.PREPARING
    done = run(rs.wait("prepared", user=USER, timeout=120))
    assert done.status == R.RunStatus.COMPLETED, done.error
    assert (done.total, done.completed) == (5, 5)
    assert [o["out"] for o in outs(rs, "prepared")] == [f"t{i}:tok-prep" for i in range(5)]


def test_a_run_whose_control_plane_died_before_its_inputs_were_stored_fails_clearly(
        rs, tmp_path, run_settings):
    flow = flow_copy(tmp_path, "echo")
    env = {**os.environ, "FLOWSESSION_HOME": str(run_settings.home),
           "FLOWSESSION_IMAGES_DIR": str(run_settings.images_dir),
           "FLOWSESSION_INDEX_URL": run_settings.index_url}
    died = subprocess.run([sys.executable, "-c", DIE_AFTER_INPUTS, str(flow),
                           str(flow / "data.jsonl"), "before"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert died.returncode == 9, died.stderr
    failed = run(rs.advance("prepared", user=USER))
    assert failed.status == R.RunStatus.FAILED
    assert failed.error == "the control plane stopped while preparing the run"
    assert rs.details("prepared", user=USER) == [] and outs(rs, "prepared") == []
    with pytest.raises(Conflict) as exc:
        run(rs.create(RunSpec(resume_from="prepared"), user=USER))
    assert "no lines to resume" in exc.value.message
    assert [r.name for r in rs.list(user=USER)] == ["prepared"]

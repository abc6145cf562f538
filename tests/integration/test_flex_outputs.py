"""Flex flows return what prompt flow accepts, and a line's failure is the line's: against a
real server with real sessions, through the CLI (as a user types it) and the API.

An entry that returns a dict gives those outputs, a dataclass its fields, anything else
``{"output": value}`` (a generator joined as text), as ``pf`` does; whatever a line raises or
however its worker dies, that line fails with the exception's type and message, and the
session goes on (a dead worker is replaced; why is in ``session show``, ``session events`` and
``session logs``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers.cli import runner

from flowsession.client import Client
from flowsession.errors import LineFailed

pytestmark = pytest.mark.timeout(600)
REPO = Path(__file__).resolve().parents[2]
FLOWS = REPO / "tests" / "flows"

# tests/flows/flex_shapes: what each `kind` gives, as `pf run create` gave it (promptflow 1.18)
EXPECTED = {
    "dict": {"text": "a b c", "n": 1},
    "dataclass": {"text": "a b c", "length": 5},
    "str": {"output": "a b c"},
    "int": {"output": 42},
    "list": {"output": [1, "two"]},
    "none": {"output": None},
    "generator": {"output": "abc"},
}


@pytest.fixture(scope="module")
def api(server):
    with Client(url=server.url, token=server.token, flows_by_path=True) as c:
        yield c


@pytest.fixture(scope="module")
def flows(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("flows")
    shutil.copytree(FLOWS / "flex_shapes", root / "flex_shapes")
    shutil.copytree(REPO / "examples" / "flows" / "flex-echo", root / "flex-echo")
    return root


@pytest.fixture(scope="module")
def fs(server, flows):
    return runner(server.url, server.token, flows)


def test_flow_test_of_a_flex_flow_gives_what_promptflow_gives(fs, api, flows):
    for kind, outputs in EXPECTED.items():
        proc = fs("flow", "test", "flex_shapes", "--inputs", f"kind={kind}")
        assert proc.returncode == 0, f"{kind}: {proc.stderr}"
        assert json.loads(proc.stdout) == outputs, kind
        assert api.test(flows / "flex_shapes", {"kind": kind}) == outputs, kind
    # the bundled example returns a plain string
    proc = fs("flow", "test", "flex-echo", "--inputs", "text=hello")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"output": "hello"}
    shown = json.loads(fs("session", "show", "flex-echo", "--json").stdout)
    assert shown["state"] == "RUNNING"


def test_a_line_that_raises_fails_alone_with_its_type_and_message(fs, api, flows):
    proc = fs("flow", "test", "flex_shapes", "--inputs", "kind=raise", "--inputs",
             "text=apple")
    assert proc.returncode != 0
    assert "(ValueError) bad apple" in proc.stderr
    with pytest.raises(LineFailed, match=r"\(SystemExit\) 3"):
        api.test(flows / "flex_shapes", {"kind": "exit"})
    with pytest.raises(LineFailed, match=r"\(KeyError\) 'what'"):
        api.test(flows / "flex_shapes", {"kind": "what"})
    assert api.test(flows / "flex_shapes", {"kind": "str", "text": "still here"}) == {
        "output": "still here"}
    assert api.get_session(flows / "flex_shapes").state == "RUNNING"


def test_a_worker_that_dies_fails_its_line_and_is_replaced(fs, api, flows):
    proc = fs("flow", "test", "flex_shapes", "--inputs", "kind=die")
    assert proc.returncode != 0
    assert "exited with code 7 while running a line" in proc.stderr
    # the session goes on, on a new worker; `session show` and its events say what happened
    again = fs("flow", "test", "flex_shapes", "--inputs", "kind=int")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == {"output": 42}
    shown = json.loads(fs("session", "show", "flex_shapes", "--json").stdout)
    assert shown["state"] == "RUNNING"
    assert "exited with code 7 while running a line" in shown["reason"]
    events = json.loads(fs("session", "events", "flex_shapes", "--json").stdout)
    assert any("exited with code 7" in e["reason"] and e["to_state"] == "RUNNING"
               for e in events)
    # a reset is not needed, and still works
    assert fs("session", "reset", "flex_shapes").returncode == 0
    assert api.test(flows / "flex_shapes", {"kind": "dict"}) == EXPECTED["dict"]


def test_a_batch_run_of_a_flex_flow_stores_outputs_as_pf_does(fs, api, flows, server):
    proc = fs("run", "create", "--flow", "flex_shapes", "--data", "flex_shapes/data.jsonl",
              "--name", "shapes", "--stream")
    assert proc.returncode == 0, proc.stderr
    assert "7 of 10 line(s) completed" in proc.stdout
    outputs = api.get_outputs("shapes")
    assert outputs == [{"line_number": i, **v} for i, v in enumerate(EXPECTED.values())]
    rows = {r["line_number"]: r for r in api.get_details("shapes")}
    assert [rows[i]["status"] for i in range(10)] == ["Completed"] * 7 + ["Failed"] * 3
    assert "(ValueError) bad a b c" in rows[7]["error"]
    assert "(SystemExit) 3" in rows[8]["error"]
    assert "exited with code 7" in rows[9]["error"]
    shown = fs("run", "show-details", "shapes")
    assert "line 7 failed: Execution failure in 'run': (ValueError) bad a b c" in shown.stderr
    stored = server.home / "runs" / "shapes" / "outputs.jsonl"
    assert [json.loads(x) for x in stored.read_text().splitlines()] == outputs

"""What the web UI added to the REST API: a test line's trace (each node's inputs, output,
duration and status, a bypassed node marked), and paging of the run list and a run's details
(offset, max_results, a status filter)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from helpers.server import serving

FLOWS = Path(__file__).resolve().parents[1] / "flows"
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def api(tmp_path_factory, images_dir, index):
    home = tmp_path_factory.mktemp("ui-api") / "home"
    with serving(home, images_dir, index.url) as srv, httpx.Client(
            base_url=srv.url + "/api", timeout=300,
            headers={"Authorization": f"Bearer {srv.token}"}) as c:
        files = {p.name: p.read_text() for p in (FLOWS / "conditional").iterdir() if p.is_file()}
        assert c.post("/flows", json={"name": "cond", "files": files}).status_code == 201
        yield c


def test_a_test_line_with_trace_names_each_node_and_marks_the_bypassed(api):
    r = api.post("/flows/cond/test", json={"inputs": {"kind": "a", "text": "hello"},
                                           "trace": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["outputs"] == {"result": "a:HELLO", "branch_a": "HELLO"}
    by_node = {t["node"]: t for t in body["trace"]}
    assert {t["status"] for t in by_node.values()} == {"Completed", "Bypassed"}
    ran = [t for t in by_node.values() if t["status"] == "Completed"]
    assert any(t["inputs"].get("text") == "hello" for t in ran)
    assert all(t["duration"] is not None and t["duration"] >= 0 for t in ran)
    # without trace: the answer is as it always was
    plain = api.post("/flows/cond/test", json={"inputs": {"kind": "b", "text": "hello"}}).json()
    assert plain == {"outputs": {"result": "b:olleh", "branch_a": None}}


def test_runs_and_details_are_paged(api):
    lines = [{"kind": "a", "text": f"t{i}"} for i in range(7)]
    names = []
    for n in range(3):
        r = api.post("/runs", json={"flow": "cond", "name": f"paged-{n}", "data_lines": lines,
                                    "column_mapping": {"kind": "${data.kind}",
                                                       "text": "${data.text}"}})
        assert r.status_code == 202, r.text
        names.append(r.json()["run"]["name"])
        time.sleep(0.01)  # distinct creation times
    deadline = time.monotonic() + 300
    while any(api.get(f"/runs/{n}").json()["status"] not in ("Completed", "Failed")
              for n in names):
        assert time.monotonic() < deadline, "the runs did not end"
        time.sleep(0.5)
    first = [r["name"] for r in api.get("/runs?max_results=2").json()]
    second = [r["name"] for r in api.get("/runs?max_results=2&offset=2").json()]
    assert first + second == ["paged-2", "paged-1", "paged-0"]
    page = api.get("/runs/paged-0/details?offset=5&max_results=10").json()
    assert [d["line_number"] for d in page] == [5, 6]
    assert api.get("/runs/paged-0/details?status=Failed").json() == []
    assert len(api.get("/runs/paged-0/details?status=Completed").json()) == 7
    bad = api.get("/runs/paged-0/details?status=Weird")
    assert bad.status_code == 422 and "status" in bad.json()["error"]["message"]

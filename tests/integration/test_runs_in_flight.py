"""Many lines in flight (issue 11), for real: sessions, batch workers running their lines on
threads, an OpenAI-compatible endpoint on 127.0.0.1 (tests/helpers/openai_endpoint.py). What is
asserted is what a user sees: every line's record once, the right lines blamed, the token
counts, the run saying it was throttled."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from helpers.flows import run
from helpers.openai_endpoint import OpenAIEndpoint
from test_runs import (  # the same fixtures and helpers as the other runs' tests
    USER,
    batch_worker_pids,
    executions,
    flow_copy,
    go,
    outs,
    slow_flow,
    stored_positions,
    wait_until,
    write_jsonl,
)

from flowsession.errors import InvalidInput
from flowsession.runs import records as R
from flowsession.runs.spec import RunSpec, spec_from_dict

pytestmark = pytest.mark.timeout(300)

# Each line waits, up to ``wait`` seconds, until ``n`` lines of its ``tag`` have arrived: a run
# completes only if that many lines are in flight at once (no timing asserted).
MEET_YAML = """\
inputs:
  tag:
    type: string
  n:
    type: int
  wait:
    type: double
outputs:
  met:
    type: int
    reference: ${meet.output}
nodes:
- name: meet
  type: python
  source:
    type: code
    path: meet.py
  inputs:
    tag: ${inputs.tag}
    n: ${inputs.n}
    wait: ${inputs.wait}
"""
MEET_TOOL = """import time

from promptflow.core import tool


@tool
def meet(tag: str, n: int, wait: float) -> int:
    with open(f"arrived-{tag}.log", "a") as f:
        f.write("x\\n")
    deadline = time.time() + wait
    while True:
        with open(f"arrived-{tag}.log") as f:
            k = len(f.read().split())
        if k >= n:
            return n
        if time.time() > deadline:
            raise RuntimeError(f"only {k} of {n} lines were in flight together")
        time.sleep(0.02)
"""


def meet_flow(tmp_path: Path) -> Path:
    folder = tmp_path / "meet"
    folder.mkdir()
    (folder / "flow.dag.yaml").write_text(MEET_YAML)
    (folder / "meet.py").write_text(MEET_TOOL)
    return folder


def test_a_run_keeps_its_max_concurrency_of_lines_in_flight_on_two_workers(rs, tmp_path):
    flow = meet_flow(tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl", [{"tag": "a", "n": 24, "wait": 60}] * 24)
    r = go(rs, flow=str(flow), data=str(data), workers=2, max_concurrency=24)
    assert r.status == R.RunStatus.COMPLETED and (r.completed, r.failed) == (24, 0), r.errors


def test_pf_worker_count_in_the_environment_sets_the_lines_in_flight(rs, tmp_path):
    flow = meet_flow(tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl", [{"tag": "b", "n": 12, "wait": 60}] * 12)
    r = go(rs, flow=str(flow), data=str(data), workers=1,
           environment_variables={"PF_WORKER_COUNT": "12"})
    assert r.status == R.RunStatus.COMPLETED and (r.completed, r.failed) == (12, 0), r.errors
    log = (rs.files(r.name).root / "logs" / "run.log").read_text()
    assert "12 in flight" in log


def test_fewer_lines_in_flight_than_asked_is_what_max_concurrency_gives(rs, tmp_path):
    """With max_concurrency 3, four lines never meet: the first three give up, alone."""
    flow = meet_flow(tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl", [{"tag": "c", "n": 4, "wait": 1.5}] * 3)
    r = go(rs, flow=str(flow), data=str(data), workers=1, max_concurrency=3)
    assert (r.completed, r.failed) == (0, 3)
    assert all("only 3 of 4 lines" in d["error"] for d in rs.details(r.name, user=USER))


@pytest.mark.parametrize("fields, named", [
    ({"max_concurrency": 0}, "max_concurrency"),
    ({"max_concurrency": -4}, "max_concurrency"),
    ({"max_concurrency": 100000}, "1024"),
    ({"resources": {"max_concurrency": 5000}}, "1024"),
    ({"environment_variables": {"PF_WORKER_COUNT": "0"}}, "PF_WORKER_COUNT"),
    ({"environment_variables": {"PF_WORKER_COUNT": "lots"}}, "1 to 1024"),
])
def test_a_concurrency_out_of_range_is_refused_naming_the_limit(fields, named):
    with pytest.raises(InvalidInput) as caught:
        spec_from_dict({"flow": "/x", **fields})
    assert named in caught.value.message


def test_resources_max_concurrency_is_the_same_setting():
    spec, warnings = spec_from_dict({"flow": "/x", "resources": {"max_concurrency": 7}})
    assert spec.concurrency() == 7 and not warnings
    assert RunSpec(flow="/x").concurrency() == 64
    assert RunSpec(flow="/x", environment_variables={"PF_WORKER_COUNT": "16"}).concurrency() == 16


def test_a_timed_out_line_does_not_take_the_lines_in_flight_with_it(rs, tmp_path):
    flow, _ = slow_flow(tmp_path, 0, 0)
    rows = [{"text": "long", "seconds": "60"}] + [
        {"text": f"l{i}", "seconds": "1.5"} for i in range(14)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    r = go(rs, flow=str(flow), data=str(data), workers=1, max_concurrency=8, line_timeout=2.5)
    assert r.status == R.RunStatus.COMPLETED and (r.completed, r.failed) == (14, 1), r.errors
    [[line, message]] = r.errors
    assert line == 0 and "timed out" in message and "2.5 s" in message
    assert sorted(stored_positions(rs, r.name)) == list(range(15))
    ran = executions(rs, r.session_id)
    assert sorted(ran) == sorted(["long", *(f"l{i}" for i in range(14))]), ran  # each once


def test_a_worker_killed_with_many_lines_in_flight_reruns_them_and_blames_none(rs, tmp_path):
    flow, data = slow_flow(tmp_path, 40, 0.5)
    created = run(rs.create(RunSpec(flow=str(flow), data=str(data), workers=2,
                                    max_concurrency=8), user=USER))
    name = created.name
    wait_until(lambda: run(rs.advance(name, user=USER)).completed >= 2, 60,
               what="two lines done")
    victim = sorted(batch_worker_pids(rs, name))[0]
    os.kill(victim, signal.SIGKILL)
    done = run(rs.wait(name, user=USER, timeout=120))
    assert done.status == R.RunStatus.COMPLETED, done.error
    assert (done.total, done.completed, done.failed) == (40, 40, 0)
    assert sorted(stored_positions(rs, name)) == list(range(40))  # each line once
    assert [o["out"].split("@")[0] for o in outs(rs, name)] == [f"l{i}" for i in range(40)]
    ran = executions(rs, done.session_id)
    assert set(ran) == {f"l{i}" for i in range(40)}
    assert len(ran) > 40, "the killed worker had lines in flight: they ran again"
    assert all(ran.count(t) <= 2 for t in set(ran)), ran


# --- an LLM endpoint ----------------------------------------------------------------------------


def llm_run(rs, tmp_path, server: OpenAIEndpoint, n: int, **spec) -> R.Run:
    flow = flow_copy(tmp_path, "llm_chat")
    rs.connections.create({"name": "open_ai_connection", "type": "open_ai",
                           "api_key": "sk-test-key", "base_url": server.base_url}, owner=USER)
    data = write_jsonl(tmp_path / "q.jsonl", [{"question": f"question number {i}"}
                                              for i in range(n)])
    return go(rs, flow=str(flow), data=str(data), **spec)


def test_token_usage_per_line_and_per_run_as_pf_run_show_gives_it(rs, tmp_path):
    with OpenAIEndpoint(latency=0.05) as server:
        r = llm_run(rs, tmp_path, server, 6, max_concurrency=4)
    assert r.status == R.RunStatus.COMPLETED and r.completed == 6, r.errors
    details = rs.details(r.name, user=USER)
    per_line = [d["system_metrics"] for d in details]
    assert all(m["total_tokens"] == m["prompt_tokens"] + m["completion_tokens"] > 0
               for m in per_line), per_line
    metrics = rs.system(r)["system_metrics"]
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert metrics[key] == sum(m[key] for m in per_line)
    assert metrics["duration"] > 0


def test_a_rate_limited_endpoint_slows_the_run_down_and_the_run_says_so(rs, tmp_path):
    with OpenAIEndpoint(latency=0.05, rate=20) as server:
        r = llm_run(rs, tmp_path, server, 80, max_concurrency=32, workers=2)
        stats = server.stats()
    assert r.status == R.RunStatus.COMPLETED and (r.completed, r.failed) == (80, 0), r.errors
    assert stats["rate_limited"] > 0 and stats["answered"] == 80
    throttle = rs.system(r)["throttle"]
    assert throttle["throttled"] > 0 and throttle["in_flight_limit"] < 32, throttle
    log = (rs.files(r.name).root / "logs" / "run.log").read_text()
    assert "429" in log


def test_an_endpoint_that_always_answers_429_fails_the_lines_with_the_reason(rs, tmp_path):
    with OpenAIEndpoint(always_429=True) as server:
        r = llm_run(rs, tmp_path, server, 3, max_concurrency=3, line_timeout=4)
    assert r.status == R.RunStatus.COMPLETED and (r.completed, r.failed) == (0, 3)
    for d in rs.details(r.name, user=USER):
        assert "timed out" in d["error"] and "429" in d["error"], d["error"]


def test_a_hanging_endpoint_times_out_its_line_and_the_others_go_on(rs, tmp_path):
    flow = flow_copy(tmp_path, "llm_chat")
    with OpenAIEndpoint(latency=0.05) as server:
        rs.connections.create({"name": "open_ai_connection", "type": "open_ai",
                               "api_key": "sk-test-key", "base_url": server.base_url},
                              owner=USER)
        data = write_jsonl(tmp_path / "q.jsonl", [{"question": "HANG"}] + [
            {"question": f"q{i}"} for i in range(10)])
        r = go(rs, flow=str(flow), data=str(data), max_concurrency=4, line_timeout=3)
    assert (r.completed, r.failed) == (10, 1), r.errors
    assert r.errors[0][0] == 0 and "timed out" in r.errors[0][1]
    assert [o["answer"] for o in outs(rs, r.name)] == [f"echo: q{i}" for i in range(10)]

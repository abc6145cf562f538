"""Lines in flight from the shell and over the API (issue 11): the setting, its limits."""

from __future__ import annotations

import json

import httpx
import pytest
from test_cli_runs import flow_copy

pytestmark = pytest.mark.timeout(300)


def test_max_concurrency_from_the_shell_and_its_limits(fs, tmp_path, settings):
    flow_copy(tmp_path, "echo")
    for value, says in (("0", "greater than or equal to 1"), ("-3", "greater than or equal to 1"),
                        ("5000", "less than or equal to 1024")):
        bad = fs("run", "create", "--flow", "echo", "--data", "echo/data.jsonl",
                 "--max-concurrency", value)
        assert bad.returncode != 0 and "max_concurrency" in bad.stderr and says in bad.stderr, \
            bad.stderr
    bad = fs("run", "create", "--flow", "echo", "--data", "echo/data.jsonl",
             "--environment-variables", "PF_WORKER_COUNT=many")
    assert bad.returncode != 0 and "PF_WORKER_COUNT" in bad.stderr and "1 to 1024" in bad.stderr

    r = fs.json("run", "create", "--flow", "echo", "--data", "echo/data.jsonl",
                "--max-concurrency", "3", "--name", "three")
    assert r["status"] == "Completed" and r["completed"] == 4
    assert r["system_metrics"]["total_tokens"] == 0 and r["throttle"] is None
    assert "4 line(s) to run on" in fs.ok("run", "logs", "three").stdout
    assert "3 in flight" in fs.ok("run", "logs", "three").stdout

    # the API refuses it too, with a 422 naming the field and the limit
    client = json.loads((settings.home / "client.json").read_text())
    answer = httpx.post(f"{client['url']}/api/runs", json={"flow": "echo", "max_concurrency": 2000},
                        headers={"Authorization": f"Bearer {client['token']}"}, timeout=30)
    assert answer.status_code == 422
    error = answer.json()["error"]
    assert error["field"] == "max_concurrency" and "1024" in error["message"], error


def test_run_show_says_a_run_was_throttled_and_counts_its_tokens(fs, tmp_path):
    from helpers.openai_endpoint import OpenAIEndpoint

    flow_copy(tmp_path, "llm_chat")
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"question": f"q {i}"}) + "\n"
                                              for i in range(60)))
    with OpenAIEndpoint(latency=0.05, rate=20) as server:
        (tmp_path / "conn.yml").write_text(server.connection_yaml())
        fs.ok("connection", "create", "--file", "conn.yml")
        r = fs.json("run", "create", "--flow", "llm_chat", "--data", "q.jsonl", "--name", "lim")
    assert r["status"] == "Completed" and (r["completed"], r["failed"]) == (60, 0), r
    shown = fs.ok("run", "show", "lim").stdout
    assert "throttled: the endpoint answered 429 (rate limited)" in shown, shown
    assert f"tokens: {r['system_metrics']['total_tokens']} (prompt" in shown, shown
    details = fs.json("run", "show-details", "lim")
    assert all(row["system_metrics"]["total_tokens"] > 0 for row in details), details[:2]

"""A batch worker's lighter promptflow (src/flowsession/worker/pfcost.py) changes nothing a
user sees, for real: sessions, batch workers, an OpenAI-compatible endpoint on 127.0.0.1.
Prompts render as promptflow renders them and the jinja sandbox still holds; nodes that run
side by side get their own inputs on every line; token counts are counted; the run's log has no
five progress lines a line (the nodes' prints stay) unless the run asks for them with
PF_LOGGING_LEVEL."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.openai_endpoint import OpenAIEndpoint
from test_runs import (  # the same fixtures and helpers as the other runs' tests
    USER,
    flow_copy,
    go,
    outs,
    write_jsonl,
)

from flowsession.runs import records as R

pytestmark = pytest.mark.timeout(300)

# A prompt with a loop, a filter and a condition; the line whose question is "escape" reaches
# for a Python internal, which promptflow's sandbox refuses
PROMPT = """\
# system:
You answer briefly.

# user:
{% for w in words %}{{ w | upper }}{% if not loop.last %}-{% endif %}{% endfor %} {{ question }}
{% if question == "escape" %}{{ question.__class__.__mro__[1].__subclasses__() }}{% endif %}
"""

CHAT_YAML = """\
inputs:
  question:
    type: string
  words:
    type: list
outputs:
  answer:
    type: string
    reference: ${chat.output}
nodes:
- name: chat
  type: llm
  source:
    type: code
    path: chat.jinja2
  api: chat
  connection: open_ai_connection
  inputs:
    model: gpt-4o-mini
    temperature: 0
    question: ${inputs.question}
    words: ${inputs.words}
"""


def chat_flow(rs, tmp_path: Path, server: OpenAIEndpoint) -> Path:
    flow = flow_copy(tmp_path, "llm_chat", "chat_words")
    (flow / "flow.dag.yaml").write_text(CHAT_YAML)
    (flow / "chat.jinja2").write_text(PROMPT)
    rs.connections.create({"name": "open_ai_connection", "type": "open_ai",
                           "api_key": "sk-test-key", "base_url": server.base_url}, owner=USER)
    return flow


def run_log(rs, name: str) -> str:
    return "".join(p.read_text(errors="replace") for p in rs.log_files(name, user=USER))


def test_prompts_render_as_promptflow_renders_them_and_the_sandbox_holds(rs, tmp_path):
    rows = [{"question": f"q{i}", "words": ["x", f"w{i}", "z"][: 1 + i % 3]} for i in range(30)]
    rows[7] = {"question": "escape", "words": ["a"]}
    with OpenAIEndpoint(latency=0.02) as server:
        flow = chat_flow(rs, tmp_path, server)
        r = go(rs, flow=str(flow), data=str(write_jsonl(tmp_path / "d.jsonl", rows)),
               max_concurrency=8)
    assert r.status == R.RunStatus.COMPLETED and r.completed == 29 and r.failed == 1, r.errors
    answers = {o["line_number"]: o["answer"] for o in outs(rs, r.name)}
    for i, row in enumerate(rows):
        if i == 7:
            continue
        assert answers[i] == "echo: " + "-".join(w.upper() for w in row["words"]) + " " + \
            row["question"], (i, answers[i])
    failed = {d["line_number"]: d for d in rs.details(r.name, user=USER)
              if d["status"] != "Completed"}
    assert list(failed) == [7]
    assert "unsafe" in str(failed[7]["error"]) and "jinja" in str(failed[7]["error"]).lower()


def test_the_run_log_has_no_line_by_line_node_info_unless_the_run_asks(rs, tmp_path):
    rows = [{"question": f"q{i}", "words": ["w"]} for i in range(12)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    with OpenAIEndpoint(latency=0.02) as server:
        flow = chat_flow(rs, tmp_path, server)
        quiet = go(rs, flow=str(flow), data=str(data), max_concurrency=4)
        chatty = go(rs, flow=str(flow), data=str(data), max_concurrency=4,
                    environment_variables={"PF_LOGGING_LEVEL": "INFO"})
    for r in (quiet, chatty):
        assert r.status == R.RunStatus.COMPLETED and r.completed == 12, r.errors
        tokens = [d["system_metrics"].get("total_tokens") for d in rs.details(r.name, user=USER)]
        assert all(t and t > 0 for t in tokens), tokens  # counted either way
    log = run_log(rs, quiet.name)
    assert "Executing node chat" not in log and "Failed to calculate metrics" not in log, log
    assert run_log(rs, chatty.name).count("Executing node chat") >= 12


PARALLEL_YAML = """\
inputs:
  text:
    type: string
outputs:
  joined:
    type: string
    reference: ${join.output}
nodes:
- name: left
  type: python
  source:
    type: code
    path: left.py
  inputs:
    text: ${inputs.text}
- name: right
  type: python
  source:
    type: code
    path: right.py
  inputs:
    text: ${inputs.text}
- name: join
  type: python
  source:
    type: code
    path: join.py
  inputs:
    a: ${left.output}
    b: ${right.output}
"""

NODES = {  # promptflow takes one tool per file
    # the node sees its line's context (promptflow's OperationContext), as in its own thread
    "left.py": "import time\nfrom promptflow.core import tool\n"
               "from promptflow.tracing._operation_context import OperationContext\n\n\n"
               "@tool\ndef left(text: str) -> str:\n    time.sleep(0.01)\n"
               "    seen = OperationContext.get_instance().get('root_run_id')\n"
               "    return ('L' if seen else 'no context ') + text\n",
    "right.py": "from promptflow.core import tool\n\n\n@tool\ndef right(text: str) -> str:\n"
                "    print(f'right saw {text}')\n    if text == 'boom':\n        raise ValueError('right refuses boom')\n"
                "    return text + 'R'\n",
    "join.py": "from promptflow.core import tool\n\n\n@tool\n"
               "def join(a: str, b: str) -> str:\n    return a + '|' + b\n",
}


def test_nodes_side_by_side_get_their_own_line_on_every_line(rs, tmp_path):
    flow = tmp_path / "parallel"
    flow.mkdir()
    (flow / "flow.dag.yaml").write_text(PARALLEL_YAML)
    for name, code in NODES.items():
        (flow / name).write_text(code)
    rows = [{"text": f"t{i}"} for i in range(60)]
    rows[13] = {"text": "boom"}
    r = go(rs, flow=str(flow), data=str(write_jsonl(tmp_path / "d.jsonl", rows)),
           max_concurrency=16)
    assert r.status == R.RunStatus.COMPLETED and r.completed == 59 and r.failed == 1, r.errors
    got = {o["line_number"]: o["joined"] for o in outs(rs, r.name)}
    assert got == {i: f"Lt{i}|t{i}R" for i in range(60) if i != 13}
    failed = [d for d in rs.details(r.name, user=USER) if d["status"] != "Completed"]
    assert [d["line_number"] for d in failed] == [13]
    assert "right refuses boom" in str(failed[0]["error"])
    log = run_log(rs, r.name)  # the nodes' prints are in the run's log, its progress lines not
    assert "right saw t5" in log and "right saw t59" in log, log[-3000:]
    assert "Executing node" not in log

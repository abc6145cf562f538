"""What bench/compat.py found different from `pf run create`, each on a flow written here,
against a real server with real sessions, through the CLI as a user types it."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest
from helpers.cli import runner

pytestmark = pytest.mark.timeout(600)
FLOWS = Path(__file__).resolve().parents[1] / "flows"


@pytest.fixture(scope="module")
def flows(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("flows")
    for name in ("relative_file", "input_defaults", "image_output", "flex_aggregate", "env_vars",
                 "flex_env_vars", "flex_in_dag_yaml"):
        shutil.copytree(FLOWS / name, root / name)
    return root


@pytest.fixture(scope="module")
def fs(server, flows):
    return runner(server.url, server.token, flows)


def test_a_flow_runs_in_its_own_folder_as_in_prompt_flow(fs):
    """Flow code that opens its files by relative paths finds them, in a test line and in a
    batch run (pf runs a flow with its folder as the working directory)."""
    proc = fs("flow", "test", "relative_file", "--inputs", "name=Ada")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"greeting": "Hello, Ada!"}
    run = fs("run", "create", "--flow", "relative_file", "--data", "relative_file/data.jsonl",
             "--name", "relative", "--stream")
    assert run.returncode == 0, run.stderr
    details = json.loads(fs("run", "show-details", "relative", "--json").stdout)
    assert [(d["status"], d["outputs"]) for d in details] == [
        ("Completed", {"greeting": "Hello, Ada!"}), ("Completed", {"greeting": "Hello, Linus!"})]


def test_an_input_with_a_default_keeps_it_unless_mapped_as_in_prompt_flow(fs):
    """pf run create: a flow input with a default takes it even when the data has a column
    of that name ("default value is in higher priority than default mapping"); a column
    mapping gives it the data's value; a None default gives way to the data."""
    data = "input_defaults/data.jsonl"
    assert fs("run", "create", "--flow", "input_defaults", "--data", data,
              "--name", "defaults").returncode == 0
    rows = json.loads(fs("run", "show-details", "defaults", "--json").stdout)
    assert [r["outputs"] for r in rows] == [{"text": "Hello Ada!"}, {"text": "Hello Linus?"}]
    mapped = fs("run", "create", "--flow", "input_defaults", "--data", data,
                "--name", "mapped", "--column-mapping", "greeting=${data.greeting}")
    assert mapped.returncode == 0, mapped.stderr
    rows = json.loads(fs("run", "show-details", "mapped", "--json").stdout)
    assert [r["outputs"] for r in rows] == [{"text": "Hi Ada!"}, {"text": "Hey Linus?"}]


def test_images_in_outputs_come_back_inline_as_prompt_flow_writes_them(fs, flows):
    """An output image (promptflow's Image) is `{"data:<mime>;base64": ...}` -- pf's own
    inline form -- in a test line, in show-details and in outputs.jsonl, not `Image(1a2b)`."""
    lines = (flows / "image_output" / "data.jsonl").read_text().splitlines()
    red, blue = (json.loads(line)["image"] for line in lines)
    dot = red["data:image/png;base64"]
    made = base64.b64encode(b"GIF89a-red").decode()
    proc = fs("flow", "test", "image_output", "--inputs", "label=red", "--inputs",
              f"image={json.dumps(red)}")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"labelled": {
        "label": "red", "image": {"data:image/png;base64": dot},
        "made": {"data:image/gif;base64": made}}}
    run = fs("run", "create", "--flow", "image_output", "--data", "image_output/data.jsonl",
             "--name", "images")
    assert run.returncode == 0, run.stderr
    rows = json.loads(fs("run", "show-details", "images", "--json").stdout)
    assert [r["status"] for r in rows] == ["Completed", "Completed"]
    first, second = (r["outputs"]["labelled"] for r in rows)
    assert first == {"label": "red", "image": {"data:image/png;base64": dot},
                     "made": {"data:image/gif;base64": made}}
    assert second["image"] == blue
    assert second["made"] == {"data:image/gif;base64": base64.b64encode(b"GIF89a-blue").decode()}


def test_a_flex_class_with_aggregate_gives_the_runs_metrics(fs):
    """A flex class's __aggregate__ runs over the completed lines' outputs (dicts readable as
    attributes, as pf gives them), and what it returns is the run's metrics."""
    run = fs("run", "create", "--flow", "flex_aggregate", "--data", "flex_aggregate/data.jsonl",
             "--name", "counted")
    assert run.returncode == 0, run.stderr
    shown = json.loads(fs("run", "show", "counted", "--json").stdout)
    assert (shown["completed"], shown["failed"]) == (2, 1)
    metrics = json.loads(fs("run", "show-metrics", "counted", "--json").stdout)
    assert metrics == {"lines": 2, "total": 8}


def test_a_flows_environment_variables_are_set_as_in_prompt_flow(fs):
    """environment_variables of flow.dag.yaml and flow.flex.yaml are in the flow's
    environment (a number as its text) in a test line and a run; a run's own
    --environment-variables win over them."""
    proc = fs("flow", "test", "env_vars", "--inputs", "name=Ada")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"text": "Hola Ada x2"}
    proc = fs("flow", "test", "flex_env_vars", "--inputs", "name=Ada")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"output": "Salut Ada"}
    for flow, name, extra, want in [
            ("env_vars", "env", [], {"text": "Hola Ada x2"}),
            ("env_vars", "env_over", ["--environment-variables", "GREETING=Hi"],
             {"text": "Hi Ada x2"}),
            ("flex_env_vars", "flex_env", [], {"output": "Salut Ada"})]:
        run = fs("run", "create", "--flow", flow, "--data", f"{flow}/data.jsonl",
                 "--name", name, *extra)
        assert run.returncode == 0, run.stderr
        rows = json.loads(fs("run", "show-details", name, "--json").stdout)
        assert [r["outputs"] for r in rows] == [want], name


def test_a_flow_dag_yaml_with_an_entry_runs_as_a_flex_flow(fs):
    """An early flex flow (flow.dag.yaml with `entry:`): its data is mapped to its entry's
    parameters, as pf maps it."""
    run = fs("run", "create", "--flow", "flex_in_dag_yaml", "--data",
             "flex_in_dag_yaml/data.jsonl", "--name", "early_flex")
    assert run.returncode == 0, run.stderr
    rows = json.loads(fs("run", "show-details", "early_flex", "--json").stdout)
    assert [r["outputs"] for r in rows] == [{"output": "HI!"}, {"output": "YO!"}]


def test_a_batch_run_of_a_dag_flow_without_inputs_is_refused_as_by_pf(fs, flows):
    """pf refuses it ("The input for flow cannot be empty in batch mode"); here too, before
    anything starts, saying what to do. One line of it still runs with flow test."""
    folder = flows / "no_inputs"
    folder.mkdir()
    (folder / "flow.dag.yaml").write_text(
        "outputs:\n  said:\n    type: string\n    reference: ${say.output}\nnodes:\n"
        "- name: say\n  type: python\n  source:\n    type: code\n    path: say.py\n")
    (folder / "say.py").write_text("from promptflow.core import tool\n\n\n@tool\n"
                                   "def say() -> str:\n    return 'hi'\n")
    (folder / "data.jsonl").write_text('{"x": 1}\n')
    refused = fs("run", "create", "--flow", "no_inputs", "--data", "no_inputs/data.jsonl",
                 "--name", "no_inputs")
    assert refused.returncode != 0
    assert "declares no inputs" in refused.stderr and "flow test" in refused.stderr
    assert fs("run", "show", "no_inputs").returncode != 0  # no run was made
    proc = fs("flow", "test", "no_inputs")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"said": "hi"}

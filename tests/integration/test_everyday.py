"""Everyday use as a prompt flow user meets it (issue 10): pf's habits on the command line,
through the installed console command against the real local server and real sessions."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_cli_runs import Cli, fs  # noqa: F401  (the fixture)

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

"""The `flowsession` command: what a user types and what they see."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.flows import make_flow
from typer.testing import CliRunner

from flowsession.cli.main import app


@pytest.fixture
def cli(settings):
    env = {"FLOWSESSION_HOME": str(settings.home), "FLOWSESSION_IMAGES_DIR": str(settings.images_dir),
           "FLOWSESSION_INDEX_URL": settings.index_url, "COLUMNS": "200", "NO_COLOR": "1"}
    runner = CliRunner()

    def invoke(*args: str, input: str | None = None):
        return runner.invoke(app, list(args), env=env, input=input)

    invoke.env = env
    return invoke


def test_image_list_and_show_print_json(cli):
    listed = cli("image", "list", "--json")
    assert listed.exit_code == 0, listed.output
    images = json.loads(listed.stdout)
    assert [(i["ref"], i["state"]) for i in images] == [("flowsession/runtime:1", "READY")]
    shown = json.loads(cli("image", "show", "flowsession/runtime", "--json").stdout)
    assert shown["installed"]["promptflow-core"] == "1.18.5"


def test_env_build_prints_the_env_id_and_packages_their_origin(cli, tmp_path):
    flow = make_flow(tmp_path, "f", "tinyalpha==1.0\n")
    built = cli("env", "build", str(flow))
    assert built.exit_code == 0, built.output
    env_id = built.stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{32}", env_id)
    pkgs = json.loads(cli("env", "packages", str(flow), "--json").stdout)
    assert {"name": "tinyalpha", "version": "1.0", "origin": "requirements"} in pkgs
    assert {"name": "promptflow-core", "version": "1.18.5", "origin": "image"} in pkgs
    envs = json.loads(cli("env", "list", "--json").stdout)
    assert [e["id"] for e in envs] == [env_id]
    table = cli("env", "packages", str(flow))
    assert "tinyalpha" in table.stdout and "requirements" in table.stdout


def test_a_missing_flow_file_is_a_clear_error_without_a_traceback(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    result = cli("env", "build", str(tmp_path / "empty"))
    assert result.exit_code == 2
    assert "flow.dag.yaml" in result.stderr and "hint:" in result.stderr
    assert "Traceback" not in result.output + result.stderr


def test_a_yaml_syntax_error_names_the_file_and_line(cli, tmp_path):
    flow = make_flow(tmp_path, "f", None)
    (flow / "flow.dag.yaml").write_text("inputs:\n  x: {type: string\nnodes: []\n")
    result = cli("env", "build", str(flow))
    assert result.exit_code == 2
    assert re.search(r"flow\.dag\.yaml, line \d+", result.stderr), result.stderr


def test_an_unsatisfiable_requirement_names_the_conflict(cli, tmp_path):
    result = cli("env", "build", str(make_flow(tmp_path, "f", "tinybeta\ntinygamma\n")))
    assert result.exit_code != 0
    assert "tinybeta" in result.stderr and "tinygamma" in result.stderr
    assert "hint:" in result.stderr


def test_image_check_says_whether_a_newer_version_exists(cli, tmp_path):
    flow = make_flow(tmp_path, "f", None, image="flowsession/runtime:1")
    result = json.loads(cli("image", "check", str(flow), "--json").stdout)
    assert result["current_version"] == 1 and result["newer_available"] is False


def test_image_create_from_a_requirements_file(cli, tmp_path):
    reqs = tmp_path / "extra.txt"
    reqs.write_text("tinyalpha==2.0\n")
    result = cli("image", "create", "team/alpha", "--from", "flowsession/runtime", "-r", str(reqs),
                 "--json")
    assert result.exit_code == 0, result.output
    image = json.loads(result.stdout)
    assert image["ref"] == "team/alpha:1" and image["state"] == "READY"


def test_feed_secrets_are_read_from_stdin_and_listed_masked(cli):
    result = cli("feed", "set", "pkgs.example.com", "--stdin", input="me:tok-123456\n")
    assert result.exit_code == 0
    listed = cli("feed", "list", "--json")
    assert json.loads(listed.stdout) == [
        {"identity": "user", "host": "pkgs.example.com", "secret": "me:****",
         "created_at": json.loads(listed.stdout)[0]["created_at"]}]
    assert "tok-123456" not in listed.stdout + cli("feed", "list").stdout


def test_the_installed_command_runs_a_command_in_the_flows_environment(cli, tmp_path):
    exe = Path(sys.executable).parent / "flowsession"
    if not exe.exists():
        exe = Path(shutil.which("flowsession") or "flowsession")
    flow = make_flow(tmp_path, "f", "tinyalpha==2.0\n")
    out = subprocess.run(
        [str(exe), "env", "run", str(flow), "--", "python", "-c",
         "import tinyalpha, promptflow.core; print('alpha', tinyalpha.__version__)"],
        env={**os.environ, **cli.env}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "alpha 2.0"


def test_an_unreachable_database_names_the_setting(cli):
    from typer.testing import CliRunner

    env = {**cli.env, "FLOWSESSION_DATABASE_URL": "postgresql+psycopg://who:pw@127.0.0.1:1/x"}
    result = CliRunner().invoke(app, ["env", "list"], env=env)
    assert result.exit_code == 1
    assert "cannot open the database" in result.stderr and "FLOWSESSION_DATABASE_URL" in result.stderr
    assert "pw" not in result.stderr.replace("postgresql", "")  # the password is hidden
    assert "Traceback" not in result.stderr


def test_env_show_and_remove_and_image_build_through_the_server(cli, tmp_path):
    flow = make_flow(tmp_path, "f", "tinyalpha==1.0\n")
    env_id = cli("env", "build", str(flow)).stdout.strip()
    shown = cli("env", "show", env_id, "--json")
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.stdout)
    assert data["id"] == env_id and data["state"] == "READY" and data["holders"] == []
    assert data["log"].endswith(f"{env_id}.log")
    assert "tinyalpha==1.0" in cli("env", "show", env_id).stdout  # the lock
    removed = cli("env", "remove", env_id)
    assert removed.exit_code == 0 and f"removed {env_id}" in removed.stdout
    assert json.loads(cli("env", "list", "--json").stdout) == []
    missing = cli("env", "show", env_id)
    assert missing.exit_code == 1 and "hint:" in missing.stderr
    built = cli("image", "build", "--json")
    assert built.exit_code == 0, built.output
    assert json.loads(built.stdout)["ref"] == "flowsession/runtime:1"
    assert "ready at" in cli("image", "build").stdout


def test_managed_identities_hold_feed_secrets_and_connections(cli, tmp_path):
    conn = tmp_path / "c.yml"
    conn.write_text("name: team_conn\ntype: custom\nconfigs: {a: b}\nsecrets: {k: s3cr3t-v4lue}\n")
    assert cli("connection", "create", "-f", str(conn)).exit_code == 0
    made = cli("identity", "create", "team", "--description", "the team's", "--json")
    assert made.exit_code == 0, made.output
    assert json.loads(made.stdout)["feed_hosts"] == []
    stored = cli("identity", "set-feed", "team", "pkgs.example.com", "--stdin",
                 input="bot:tok-987654\n")
    assert stored.exit_code == 0, stored.output
    linked = json.loads(cli("identity", "set-connections", "team", "team_conn", "--json").stdout)
    assert linked["connections"] == ["team_conn"]
    shown = json.loads(cli("identity", "show", "team", "--json").stdout)
    assert (shown["feed_hosts"], shown["connections"], shown["usable"]) == (
        ["pkgs.example.com"], ["team_conn"], True)
    listed = cli("identity", "list")
    assert "team" in listed.stdout and "pkgs.example.com" in listed.stdout
    feeds = json.loads(cli("feed", "list", "--identity", "team", "--json").stdout)
    assert [(f["identity"], f["host"], f["secret"]) for f in feeds] == [
        ("team", "pkgs.example.com", "bot:****")]
    assert cli("identity", "delete-feed", "team", "pkgs.example.com").exit_code == 0
    assert json.loads(cli("identity", "show", "team", "--json").stdout)["feed_hosts"] == []
    assert cli("identity", "delete", "team").exit_code == 0
    gone = cli("identity", "show", "team")
    assert gone.exit_code == 1 and "does not exist" in gone.stderr
    assert "tok-987654" not in "".join(
        r.stdout + r.stderr for r in (stored, listed, gone))

"""``flowsession connection ...``: what a user types and sees; secrets never shown or stored in
clear; one user's connections are invisible to another (a second user of the same server, with
the token its Owner made for them); promptflow accepts the executor dict."""

from __future__ import annotations

import json
import subprocess

import pytest
from typer.testing import CliRunner

from flowsession.access.connections import ConnectionService
from flowsession.cli.main import app
from flowsession.environments.images import DEFAULT_IMAGE

SECRET = "sk-cli-secret-9f8e7d6c5b4a"
CUSTOM_SECRET = "custom-secret-a1b2c3d4"

OPENAI = f"""\
$schema: https://azuremlschemas.azureedge.net/promptflow/latest/OpenAIConnection.schema.json
name: open_ai_connection
type: open_ai
api_key: "{SECRET}"
organization: ""
base_url: "http://127.0.0.1:9999/v1"
"""

CUSTOM = f"""\
name: my_custom
type: custom
configs:
  endpoint: https://api.example.com
secrets:
  token: "{CUSTOM_SECRET}"
"""


@pytest.fixture
def cli(settings):
    env = {"FLOWSESSION_HOME": str(settings.home),
           "FLOWSESSION_IMAGES_DIR": str(settings.images_dir),
           "FLOWSESSION_INDEX_URL": settings.index_url, "FLOWSESSION_USER": "alice",
           "COLUMNS": "200", "NO_COLOR": "1"}
    runner = CliRunner()
    seen: list[str] = []  # every output, to check no secret was ever shown
    tokens: dict[str, str] = {}  # other users of alice's (local) server: their tokens

    def invoke(*args: str, user: str = "alice"):
        extra = {}
        if user != "alice":  # alice, the server's Owner, makes the user; they use its token
            if user not in tokens:
                made = runner.invoke(app, ["user", "create", user, "--role", "Data Scientist",
                                           "--json"], env=env)
                assert made.exit_code == 0, made.output
                tokens[user] = json.loads(made.stdout)["token"]
            extra = {"FLOWSESSION_TOKEN": tokens[user]}
        result = runner.invoke(app, list(args), env={**env, **extra})
        seen.append(result.stdout + result.stderr)
        return result

    invoke.seen = seen
    return invoke


@pytest.fixture
def files(tmp_path):
    (tmp_path / "openai.yml").write_text(OPENAI)
    (tmp_path / "custom.yml").write_text(CUSTOM)
    return tmp_path


def assert_no_secret(cli, settings):
    shown = "\n".join(cli.seen)
    assert SECRET not in shown and CUSTOM_SECRET not in shown
    raw = b"".join(p.read_bytes() for p in settings.home.glob("flowsession.db*"))
    assert raw, "the database file was not found"
    assert SECRET.encode() not in raw and CUSTOM_SECRET.encode() not in raw
    for log in settings.home.rglob("*.log"):
        assert SECRET not in log.read_text(errors="replace")


def test_create_list_show_delete_round_trip(cli, files, settings):
    created = cli("connection", "create", "--file", str(files / "openai.yml"))
    assert created.exit_code == 0, created.output
    assert "created connection open_ai_connection" in created.stdout
    assert "******" in created.stdout
    assert cli("connection", "create", "-f", str(files / "custom.yml"), "--json").exit_code == 0

    listed = cli("connection", "list", "--json")
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.stdout)
    assert [(r["name"], r["type"]) for r in rows] == [("my_custom", "custom"),
                                                      ("open_ai_connection", "open_ai")]
    table = cli("connection", "list")
    assert "open_ai_connection" in table.stdout and "http://127.0.0.1:9999/v1" in table.stdout

    shown = json.loads(cli("connection", "show", "open_ai_connection", "--json").stdout)
    assert shown["api_key"] == "******" and shown["base_url"] == "http://127.0.0.1:9999/v1"
    assert shown["owner"] == "alice"
    custom = json.loads(cli("connection", "show", "my_custom", "--json").stdout)
    assert custom["secrets"] == {"token": "******"}
    assert custom["configs"] == {"endpoint": "https://api.example.com"}
    text = cli("connection", "show", "my_custom")
    assert "secrets.token: ******" in text.stdout and "configs.endpoint" in text.stdout

    deleted = cli("connection", "delete", "open_ai_connection")
    assert deleted.exit_code == 0 and "deleted connection open_ai_connection" in deleted.stdout
    gone = json.loads(cli("connection", "delete", "my_custom", "--json").stdout)
    assert gone == {"name": "my_custom", "deleted": True}
    assert json.loads(cli("connection", "list", "--json").stdout) == []
    missing = cli("connection", "show", "open_ai_connection")
    assert missing.exit_code == 1 and "does not exist" in missing.stderr
    assert_no_secret(cli, settings)


def test_create_again_updates_and_name_overrides(cli, files, settings):
    assert cli("connection", "create", "-f", str(files / "openai.yml")).exit_code == 0
    (files / "openai.yml").write_text(OPENAI.replace("9999", "8888"))
    again = cli("connection", "create", "-f", str(files / "openai.yml"))
    assert again.exit_code == 0, again.output
    assert "updated connection open_ai_connection" in again.stdout
    as_json = json.loads(cli("connection", "create", "-f", str(files / "openai.yml"),
                             "--json").stdout)
    assert as_json["created"] is False and as_json["base_url"].endswith(":8888/v1")
    other = json.loads(cli("connection", "create", "-f", str(files / "openai.yml"),
                           "--name", "second", "--json").stdout)
    assert other["created"] is True and other["name"] == "second"
    names = [r["name"] for r in json.loads(cli("connection", "list", "--json").stdout)]
    assert names == ["open_ai_connection", "second"]
    assert_no_secret(cli, settings)


def test_another_user_cannot_see_or_touch_a_connection(cli, files, settings):
    assert cli("connection", "create", "-f", str(files / "openai.yml")).exit_code == 0
    assert json.loads(cli("connection", "list", "--json", user="bob").stdout) == []
    assert "open_ai_connection" not in cli("connection", "list", user="bob").stdout
    for command in ("show", "delete"):
        result = cli("connection", command, "open_ai_connection", user="bob")
        assert result.exit_code == 1
        assert "connection 'open_ai_connection' does not exist" in result.stderr
    taken = cli("connection", "create", "-f", str(files / "openai.yml"), user="bob")
    assert taken.exit_code == 1 and "already taken" in taken.stderr
    # alice's is untouched
    shown = json.loads(cli("connection", "show", "open_ai_connection", "--json").stdout)
    assert shown["owner"] == "alice"
    assert_no_secret(cli, settings)


def test_a_bad_file_is_a_clear_error_naming_file_and_field(cli, files, settings):
    bad = files / "bad.yml"
    bad.write_text(OPENAI.replace(SECRET, "<user-input>"))
    result = cli("connection", "create", "-f", str(bad))
    assert result.exit_code == 2
    assert "bad.yml" in result.stderr and "field 'api_key'" in result.stderr
    assert "hint:" in result.stderr and "Traceback" not in result.output + result.stderr
    bad.write_text(OPENAI.replace("type: open_ai", "type: bing"))
    result = cli("connection", "create", "-f", str(bad))
    assert result.exit_code == 2 and "azure_open_ai" in result.stderr
    bad.write_text(OPENAI.replace(SECRET, "${env:FS_SURELY_NOT_SET_VAR}"))
    result = cli("connection", "create", "-f", str(bad))
    assert result.exit_code == 2 and "FS_SURELY_NOT_SET_VAR" in result.stderr
    assert_no_secret(cli, settings)


def test_promptflow_in_the_image_accepts_the_executor_dict(cli, files, settings):
    python = settings.images_dir / DEFAULT_IMAGE.replace("/", "--") / "1" / "bin" / "python"
    if not python.exists():
        pytest.skip(f"the default image's python is not at {python}")
    (files / "azure.yml").write_text(
        f'name: aoai\ntype: azure_open_ai\napi_key: "{SECRET}"\n'
        "api_base: https://example.openai.azure.com/\n")
    for name in ("openai.yml", "custom.yml", "azure.yml"):
        assert cli("connection", "create", "-f", str(files / name)).exit_code == 0
    svc = ConnectionService.open(settings)
    conns = svc.for_executor(["open_ai_connection", "my_custom", "aoai"], owner="alice")
    script = """
import json, sys
from promptflow.core._connection_provider._dict_connection_provider import DictConnectionProvider
p = DictConnectionProvider(json.load(sys.stdin))
oa, cu, az = p.get("open_ai_connection"), p.get("my_custom"), p.get("aoai")
print(json.dumps({
    "oa": [type(oa).__name__, oa.api_key, oa.base_url, oa.organization],
    "cu": [type(cu).__name__, cu.configs, cu.secrets, cu.is_secret("token")],
    "az": [type(az).__name__, az.api_key, az.api_base, az.api_type, az.api_version],
}))
"""
    # the secrets go through stdin, never the command line
    done = subprocess.run([str(python), "-c", script], input=json.dumps(conns), check=False,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["oa"] == ["OpenAIConnection", SECRET, "http://127.0.0.1:9999/v1", None]
    assert got["cu"] == ["CustomConnection", {"endpoint": "https://api.example.com"},
                         {"token": CUSTOM_SECRET}, True]
    assert got["az"] == ["AzureOpenAIConnection", SECRET, "https://example.openai.azure.com/",
                         "azure", "2024-02-01"]

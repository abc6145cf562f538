"""Connections: reading prompt flow's connection YAML, masking, ${env:VAR}, owners, and the
executor's connection dict."""

from __future__ import annotations

import json
import stat

import pytest

from flowsession.access.connections import MASK, ConnectionService
from flowsession.access.secrets import FeedSecrets
from flowsession.config import Settings
from flowsession.environments.requirements import Feed
from flowsession.errors import Conflict, InvalidInput, NotFound
from flowsession.store import open_store

SECRET = "sk-very-secret-0123456789"

OPENAI = f"""\
$schema: https://azuremlschemas.azureedge.net/promptflow/latest/OpenAIConnection.schema.json
name: open_ai_connection
type: open_ai
api_key: "{SECRET}"
organization: ""
base_url: "http://127.0.0.1:9999/v1"
"""

AZURE = f"""\
name: aoai
type: azure_open_ai
api_key: "{SECRET}"
api_base: https://example.openai.azure.com/
"""

CUSTOM = f"""\
name: my_custom
type: custom
configs:
  endpoint: https://api.example.com
  retries: 3
secrets:
  token: "{SECRET}"
"""


@pytest.fixture
def svc(tmp_path) -> ConnectionService:
    settings = Settings(home=tmp_path / "home")
    return ConnectionService(settings, open_store(settings.db_url))


def write(tmp_path, text: str, name: str = "conn.yml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(svc, tmp_path, text: str, **kwargs) -> InvalidInput:
    path = write(tmp_path, text)
    with pytest.raises(InvalidInput) as info:
        svc.create_from_file(path, owner="alice", **kwargs)
    assert str(path) in info.value.message  # every error names the file
    assert SECRET not in info.value.message + info.value.hint  # and never quotes a secret
    return info.value


# --- reading the file --------------------------------------------------------------------------


def test_an_openai_connection_is_read_with_its_optional_fields(svc, tmp_path):
    conn, created = svc.create_from_file(write(tmp_path, OPENAI), owner="alice")
    assert created is True
    assert (conn.name, conn.type, conn.owner) == ("open_ai_connection", "open_ai", "alice")
    # an empty organization is left out (promptflow's default, None)
    assert conn.configs == {"base_url": "http://127.0.0.1:9999/v1"}
    assert conn.secret_keys == ["api_key"]


def test_azure_openai_gets_promptflows_defaults(svc, tmp_path):
    conn, _ = svc.create_from_file(write(tmp_path, AZURE), owner="alice")
    assert conn.configs == {"api_base": "https://example.openai.azure.com/", "api_type": "azure",
                            "api_version": "2024-02-01"}


def test_a_custom_connection_keeps_configs_and_secrets_apart(svc, tmp_path):
    conn, _ = svc.create_from_file(write(tmp_path, CUSTOM), owner="alice")
    assert conn.configs == {"endpoint": "https://api.example.com", "retries": "3"}
    assert conn.secret_keys == ["token"]


def test_name_overrides_the_files_name(svc, tmp_path):
    conn, _ = svc.create_from_file(write(tmp_path, OPENAI), owner="alice", name="other-name_2")
    assert conn.name == "other-name_2"
    assert [c.name for c in svc.list("alice")] == ["other-name_2"]


def test_an_unknown_type_lists_the_supported_ones(svc, tmp_path):
    err = error_of(svc, tmp_path, "name: x\ntype: cognitive_search\napi_key: k\n")
    assert "field 'type'" in err.message and "cognitive_search" in err.message
    for typ in ("open_ai", "azure_open_ai", "custom"):
        assert typ in err.message
    assert err.details["field"] == "type" and err.details["line"] == 2


@pytest.mark.parametrize("text, field", [
    ("type: open_ai\napi_key: k\n", "name"),
    ("name: x\napi_key: k\n", "type"),
    ("name: x\ntype: open_ai\n", "api_key"),
    ("name: x\ntype: azure_open_ai\napi_key: k\n", "api_base"),
    ("name: x\ntype: custom\nconfigs: {a: b}\n", "secrets"),
])
def test_a_missing_field_names_the_file_and_the_field(svc, tmp_path, text, field):
    err = error_of(svc, tmp_path, text)
    assert f"field '{field}': missing" in err.message
    assert err.details["field"] == field and err.hint


def test_a_user_input_placeholder_names_the_field(svc, tmp_path):
    err = error_of(svc, tmp_path, OPENAI.replace(SECRET, "<user-input>"))
    assert "field 'api_key'" in err.message and "<user-input>" in err.message
    err = error_of(svc, tmp_path, CUSTOM.replace(SECRET, "<user-input>"))
    assert "field 'secrets.token'" in err.message


def test_an_unknown_field_is_named_with_the_fields_there_are(svc, tmp_path):
    err = error_of(svc, tmp_path, OPENAI + "api_bsae: https://x\n")
    assert "field 'api_bsae'" in err.message and "base_url" in err.hint


def test_a_bad_name_is_refused(svc, tmp_path):
    err = error_of(svc, tmp_path, OPENAI.replace("open_ai_connection", "has space"))
    assert "field 'name'" in err.message
    with pytest.raises(InvalidInput, match="--name"):
        svc.create_from_file(write(tmp_path, OPENAI), owner="alice", name="a/b")
    with pytest.raises(InvalidInput):
        svc.create_from_file(write(tmp_path, OPENAI), owner="alice", name="x" * 201)


def test_a_key_under_both_configs_and_secrets_is_refused(svc, tmp_path):
    err = error_of(svc, tmp_path, CUSTOM.replace("endpoint:", "token:"))
    assert "field 'secrets.token'" in err.message


def test_a_secret_that_is_not_a_single_value_is_refused_without_quoting_it(svc, tmp_path):
    err = error_of(svc, tmp_path, OPENAI.replace(f'"{SECRET}"', f'["{SECRET}"]'))
    assert "field 'api_key'" in err.message and "list" in err.message


def test_a_yaml_error_gives_the_line_but_not_its_text(svc, tmp_path):
    err = error_of(svc, tmp_path, f'name: x\ntype: open_ai\napi_key: "{SECRET}\n')
    assert "cannot be parsed" in err.message and "line" in err.message


def test_a_file_that_is_not_there_is_named(svc, tmp_path):
    with pytest.raises(InvalidInput, match="nope.yml"):
        svc.create_from_file(tmp_path / "nope.yml", owner="alice")


# --- ${env:VAR} ---------------------------------------------------------------------------------


def test_a_secret_is_read_from_the_environment_at_create_time(svc, tmp_path, monkeypatch):
    monkeypatch.setenv("FS_TEST_OPENAI_KEY", SECRET)
    svc.create_from_file(write(tmp_path, OPENAI.replace(SECRET, "${env:FS_TEST_OPENAI_KEY}")),
                         owner="alice")
    monkeypatch.setenv("FS_TEST_OPENAI_KEY", "changed later")
    value = svc.for_executor(["open_ai_connection"], owner="alice")["open_ai_connection"]["value"]
    assert value["api_key"] == SECRET


def test_a_missing_environment_variable_is_named(svc, tmp_path, monkeypatch):
    monkeypatch.delenv("FS_TEST_MISSING", raising=False)
    err = error_of(svc, tmp_path, CUSTOM.replace(SECRET, "${env:FS_TEST_MISSING}"))
    assert "FS_TEST_MISSING" in err.message and "field 'secrets.token'" in err.message


# --- masking ------------------------------------------------------------------------------------


def test_to_dict_masks_every_secret(svc, tmp_path):
    typed, _ = svc.create_from_file(write(tmp_path, OPENAI), owner="alice")
    custom, _ = svc.create_from_file(write(tmp_path, CUSTOM, "c.yml"), owner="alice")
    d = typed.to_dict()
    assert d["api_key"] == MASK and d["base_url"] == "http://127.0.0.1:9999/v1"
    d = custom.to_dict()
    assert d["secrets"] == {"token": MASK} and d["configs"]["endpoint"] == "https://api.example.com"
    for conn in (typed, custom, *svc.list("alice")):
        assert SECRET not in json.dumps(conn.to_dict()) + repr(conn)


# --- update -------------------------------------------------------------------------------------


def test_creating_an_existing_name_updates_it(svc, tmp_path):
    first, created = svc.create_from_file(write(tmp_path, OPENAI), owner="alice")
    assert created
    second, created = svc.create_from_file(
        write(tmp_path, OPENAI.replace("9999", "8888")), owner="alice")
    assert created is False
    assert second.created_at == first.created_at and second.updated_at >= first.updated_at
    assert svc.get("open_ai_connection", owner="alice").configs["base_url"].endswith(":8888/v1")
    assert len(svc.list("alice")) == 1


def test_a_masked_secret_keeps_the_stored_value_on_update_only(svc, tmp_path):
    masked = OPENAI.replace(SECRET, MASK)
    err = error_of(svc, tmp_path, masked)
    assert "field 'api_key'" in err.message
    svc.create_from_file(write(tmp_path, OPENAI), owner="alice")
    svc.create_from_file(write(tmp_path, masked.replace("9999", "7777")), owner="alice")
    value = svc.for_executor(["open_ai_connection"], owner="alice")["open_ai_connection"]["value"]
    assert value == {"api_key": SECRET, "base_url": "http://127.0.0.1:7777/v1"}


# --- owners -------------------------------------------------------------------------------------


def test_another_owners_connection_is_not_found(svc, tmp_path):
    svc.create_from_file(write(tmp_path, OPENAI), owner="alice")
    assert svc.list("bob") == []
    with pytest.raises(NotFound):
        svc.get("open_ai_connection", owner="bob")
    with pytest.raises(NotFound):
        svc.delete("open_ai_connection", owner="bob")
    with pytest.raises(NotFound):
        svc.for_executor(["open_ai_connection"], owner="bob")
    # names are unique across owners: bob cannot take (or overwrite) alice's
    with pytest.raises(Conflict):
        svc.create_from_file(write(tmp_path, OPENAI.replace(SECRET, "bobs")), owner="bob")
    value = svc.for_executor(["open_ai_connection"], owner="alice")["open_ai_connection"]["value"]
    assert value["api_key"] == SECRET
    svc.delete("open_ai_connection", owner="alice")
    with pytest.raises(NotFound):
        svc.get("open_ai_connection", owner="alice")


# --- the executor's dict ------------------------------------------------------------------------


def test_for_executor_gives_promptflows_connection_dict(svc, tmp_path):
    svc.create_from_file(write(tmp_path, OPENAI), owner="alice")
    svc.create_from_file(write(tmp_path, AZURE, "a.yml"), owner="alice")
    svc.create_from_file(write(tmp_path, CUSTOM, "c.yml"), owner="alice")
    svc.create_from_file(write(tmp_path, CUSTOM, "d.yml"), owner="alice", name="not_asked_for")
    got = svc.for_executor(["open_ai_connection", "aoai", "my_custom"], owner="alice")
    assert got == {
        "open_ai_connection": {
            "type": "OpenAIConnection", "name": "open_ai_connection",
            "module": "promptflow.connections",
            "value": {"api_key": SECRET, "base_url": "http://127.0.0.1:9999/v1"},
            "secret_keys": ["api_key"]},
        "aoai": {
            "type": "AzureOpenAIConnection", "name": "aoai", "module": "promptflow.connections",
            "value": {"api_key": SECRET, "api_base": "https://example.openai.azure.com/",
                      "api_type": "azure", "api_version": "2024-02-01"},
            "secret_keys": ["api_key"]},
        "my_custom": {
            "type": "CustomConnection", "name": "my_custom", "module": "promptflow.connections",
            "value": {"endpoint": "https://api.example.com", "retries": "3", "token": SECRET},
            "secret_keys": ["token"]},
    }
    assert svc.for_executor([], owner="alice") == {}


def test_for_executor_names_the_missing_connections(svc, tmp_path):
    svc.create_from_file(write(tmp_path, OPENAI), owner="alice")
    with pytest.raises(NotFound) as info:
        svc.for_executor(["open_ai_connection", "nope", "gone"], owner="alice")
    assert "'gone'" in info.value.message and "'nope'" in info.value.message
    assert "open_ai_connection" not in info.value.message
    assert "flowsession connection create" in info.value.hint


# --- storage ------------------------------------------------------------------------------------


def test_secrets_are_encrypted_with_the_feed_secrets_key(svc, tmp_path):
    feeds = FeedSecrets(svc.settings, svc.store)
    feeds.set("pkgs.example.com", "me:feed-token")
    svc.create_from_file(write(tmp_path, OPENAI), owner="alice")
    key = svc.settings.secret_key_file
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert [p.name for p in key.parent.iterdir() if "secret" in p.name] == ["secret.key"]
    # both decrypt with the one key (a fresh service reads it from the file)
    fresh = ConnectionService(svc.settings, svc.store)
    assert fresh.for_executor(["open_ai_connection"], owner="alice")[
        "open_ai_connection"]["value"]["api_key"] == SECRET
    assert FeedSecrets(svc.settings, svc.store).credentials_for(
        [Feed(url="https://{private}@pkgs.example.com/simple", primary=True)]) == {
        "pkgs.example.com": "me:feed-token"}
    db = svc.settings.home / "flowsession.db"
    raw = b"".join(p.read_bytes() for p in db.parent.glob("flowsession.db*"))
    assert SECRET.encode() not in raw


@pytest.mark.postgres
def test_create_update_and_read_back_on_postgresql(tmp_path, postgres_url):
    from flowsession.store.tables import connections

    settings = Settings(home=tmp_path / "home", database_url=postgres_url)
    svc = ConnectionService(settings, open_store(postgres_url))
    with svc.store.engine.begin() as c:
        c.execute(connections.delete())
    assert svc.create_from_file(write(tmp_path, CUSTOM), owner="alice")[1] is True
    updated = write(tmp_path, CUSTOM.replace("retries: 3", "retries: 4"))
    assert svc.create_from_file(updated, owner="alice")[1] is False
    with pytest.raises(Conflict):
        svc.create_from_file(write(tmp_path, CUSTOM), owner="bob")
    assert [c.configs["retries"] for c in svc.list("alice")] == ["4"]
    value = svc.for_executor(["my_custom"], owner="alice")["my_custom"]["value"]
    assert value["token"] == SECRET
    with svc.store.engine.connect() as c:
        stored = c.execute(connections.select()).one()
    assert SECRET.encode() not in bytes(stored.secrets) and SECRET not in stored.configs
    svc.delete("my_custom", owner="alice")
    assert svc.list("alice") == []

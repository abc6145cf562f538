"""The server's images, environments, connections and managed identities, through the real
FastAPI app: tokens and scopes, other users' resources, bad bodies, secrets that never come
back, identities:use, and the audit trail. Builds are real (uv, the local index)."""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import replace
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from helpers.flows import make_flow
from helpers.index_server import LocalIndex

from flowsession.api.app import bootstrap_admin, create_app
from flowsession.errors import NotFound
from flowsession.sessions.records import ACTIVE_STATES

FLOWS = Path(__file__).resolve().parents[1] / "flows"
SECRET = "sk-never-shown-0123456789"
FEED_SECRET = "feeduser:f33d-t0ken-never-shown"


class Api:
    """One user's calls; every answer's text is kept so a test can search it for secrets."""

    def __init__(self, client: TestClient, token: str | None, seen: list[str]):
        self.client, self.seen = client, seen
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.name = ""

    def __call__(self, method: str, path: str, **kwargs):
        r = self.client.request(method, path, headers=self.headers, **kwargs)
        self.seen.append(r.text)
        return r

    def get(self, path, **kw):
        return self("GET", path, **kw)

    def post(self, path, **kw):
        return self("POST", path, **kw)

    def put(self, path, **kw):
        return self("PUT", path, **kw)

    def delete(self, path, **kw):
        return self("DELETE", path, **kw)

    def wait(self, op: dict, timeout: float = 300) -> dict:
        """The operation, once it has ended."""
        deadline = time.time() + timeout
        while True:
            got = self.get(f"/api/operations/{op['id']}").json()
            if got["status"] != "running" or time.time() > deadline:
                return got
            time.sleep(0.2)


@pytest.fixture
def server(settings, caplog):
    """(client, services, answers seen, make_api(token)); every session stopped at the end."""
    caplog.set_level(logging.DEBUG)
    app = create_app(replace(settings, idle_timeout_s=600),
                     background=False)
    svc = app.state.services
    seen: list[str] = []
    with TestClient(app) as client:
        yield client, svc, seen, functools.partial(Api, client, seen=seen)
        for session in svc.sessions.records.list(owner=None, states=ACTIVE_STATES):
            client.portal.call(functools.partial(
                svc.sessions._stop, session, actor="test", reason="teardown"))


@pytest.fixture
def owner(server):
    _client, svc, _seen, api = server
    admin = api(bootstrap_admin(svc, None))
    admin.name = svc.settings.user
    return admin


def user(owner: Api, name: str, *roles: str) -> Api:
    r = owner.post("/api/users", json={"name": name, "roles": list(roles)})
    assert r.status_code == 201, r.text
    return Api(owner.client, r.json()["token"], owner.seen)


def role(owner: Api, name: str, *scopes: str) -> None:
    r = owner.post("/api/roles", json={"name": name, "scopes": list(scopes)})
    assert r.status_code == 201, r.text


def flow_files(tmp_path: Path, name: str, requirements: str | None) -> dict[str, str]:
    folder = make_flow(tmp_path / "src", name, requirements)
    return {p.name: p.read_text() for p in folder.iterdir() if p.is_file()}


def register(api: Api, tmp_path: Path, name: str, requirements: str | None = None) -> None:
    r = api.post("/api/flows", json={"name": name,
                                     "files": flow_files(tmp_path, name, requirements)})
    assert r.status_code == 201, r.text


def error(r, status: int) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


def audit_actions(owner: Api, actor: str) -> list[tuple[str, str]]:
    """(method and route without the /api prefix, result) of the actor's audit entries."""
    entries = owner.get(f"/api/audit?limit=500&actor={actor}").json()
    return [(e["action"].replace(" /api/", " /", 1), e["result"]) for e in entries]


# --- tokens and scopes -----------------------------------------------------------------------

NEW_ENDPOINTS = [
    ("GET", "/api/images"), ("GET", "/api/images/flowsession/runtime:1"),
    ("POST", "/api/images/flowsession/runtime/build"), ("POST", "/api/images"),
    ("GET", "/api/environments"), ("GET", "/api/environments/abc"),
    ("GET", "/api/environments/abc/packages"), ("DELETE", "/api/environments/abc"),
    ("GET", "/api/flows/f/environment"), ("GET", "/api/flows/f/environment/packages"),
    ("POST", "/api/flows/f/environment/build"),
    ("GET", "/api/connections"), ("POST", "/api/connections"),
    ("GET", "/api/connections/c"), ("DELETE", "/api/connections/c"),
    ("GET", "/api/identities"), ("GET", "/api/identities/i"), ("POST", "/api/identities"),
    ("DELETE", "/api/identities/i"), ("PUT", "/api/identities/i/connections"),
    ("PUT", "/api/identities/i/feeds/pkgs.example.com"),
    ("DELETE", "/api/identities/i/feeds/pkgs.example.com"),
]


def test_every_new_endpoint_refuses_a_request_without_a_valid_token(server, owner):
    api = server[3]
    for method, path in NEW_ENDPOINTS:
        for who in (api(None), api("fs_000000000000_not-a-real-token-at-all")):
            err = error(who(method, path, json={}), 401)
            assert err["code"] == "unauthorized", (method, path)
    assert ("POST /identities", "denied") in audit_actions(owner, "anonymous")


def test_a_reader_may_look_but_changes_nothing(server, owner, tmp_path):
    reader = user(owner, "rita", "Reader")
    assert reader.get("/api/images").status_code == 200
    assert reader.get("/api/environments").status_code == 200
    assert reader.get("/api/connections").json() == []
    assert reader.get("/api/identities").json() == []
    refused = [
        ("POST", "/api/images/flowsession/runtime/build", None, "images:write"),
        ("POST", "/api/images", {"name": "x", "requirements": "tinyalpha"}, "images:write"),
        ("DELETE", "/api/environments/abc", None, "environments:write"),
        ("POST", "/api/flows/f/environment/build", None, "environments:write"),
        ("POST", "/api/connections", {"name": "c", "type": "open_ai", "api_key": SECRET},
         "connections:write"),
        ("DELETE", "/api/connections/c", None, "connections:write"),
        ("POST", "/api/identities", {"name": "i"}, "identities:write"),
        ("DELETE", "/api/identities/i", None, "identities:write"),
        ("PUT", "/api/identities/i/connections", {"connections": []}, "identities:write"),
        ("PUT", "/api/identities/i/feeds/h.example.com", {"secret": FEED_SECRET},
         "identities:write"),
    ]
    for method, path, body, scope in refused:
        err = error(reader(method, path, json=body), 403)
        assert err["code"] == "forbidden" and err["scope"] == scope, (method, path)
    actions = audit_actions(owner, "rita")
    assert ("POST /connections", "denied") in actions
    assert ("PUT /identities/{name}/feeds/{host}", "denied") in actions


# --- images ----------------------------------------------------------------------------------

def test_images_are_listed_shown_and_built_as_an_operation(server, owner):
    images = owner.get("/api/images").json()
    assert any(i["ref"] == "flowsession/runtime:1" and i["state"] == "READY" for i in images)
    for path in ("/api/images/flowsession/runtime:1", "/api/images/flowsession/runtime?version=1",
                 "/api/images/flowsession/runtime"):
        shown = owner.get(path).json()
        assert shown["ref"] == "flowsession/runtime:1", path
        assert "promptflow-core" in shown["installed"]
    assert error(owner.get("/api/images/no/such:3"), 404)["code"] == "image_not_found"
    err = error(owner.get("/api/images/flowsession/runtime:1?version=2"), 422)
    assert err["field"] == "version"
    err = error(owner.get("/api/images/flowsession/runtime?version=one"), 422)
    assert err["field"].endswith("version")

    r = owner.post("/api/images/flowsession/runtime:1/build")
    assert r.status_code == 202, r.text
    op = owner.wait(r.json())
    assert op["status"] == "succeeded" and op["kind"] == "image.build"
    assert op["result"]["ref"] == "flowsession/runtime:1"
    assert error(owner.post("/api/images/no/such/build"), 404)["code"] == "image_not_found"

    scientist = user(owner, "bob", "Data Scientist")  # images:read only
    assert scientist.get("/api/images/flowsession/runtime").status_code == 200
    assert error(scientist.post("/api/images/flowsession/runtime/build"), 403)["scope"] == \
        "images:write"
    assert ("POST /images/{ref:path}/build", "ok") in audit_actions(owner, owner.name)


def test_a_custom_image_is_made_from_requirements_text(server, owner):
    err = error(owner.post("/api/images", json={"name": "team/tiny", "requirements": 7}), 422)
    assert err["field"] == "requirements"
    err = error(owner.post("/api/images", json={"name": "team/tiny", "requirements": "x",
                                                "colour": "red"}), 422)
    assert err["field"] == "colour"
    err = error(owner.post("/api/images", json={"name": "team/tiny:3",
                                                "requirements": "tinyalpha"}), 422)
    assert err["field"] == "name"
    err = error(owner.post("/api/images", json={"name": "team/tiny", "base": "no/such",
                                                "requirements": "tinyalpha"}), 404)
    assert err["code"] == "image_not_found"

    r = owner.post("/api/images", json={"name": "team/tiny", "requirements": "tinyalpha==1.0\n",
                                        "description": "with tinyalpha"})
    assert r.status_code == 202, r.text
    op = owner.wait(r.json())
    assert op["status"] == "succeeded", op
    assert op["result"]["ref"] == "team/tiny:1"
    shown = owner.get("/api/images/team/tiny").json()
    assert shown["state"] == "READY" and shown["parent"] == "flowsession/runtime:1"
    assert shown["installed"]["tinyalpha"] == "1.0"
    assert ("POST /images", "ok") in audit_actions(owner, owner.name)


def test_without_all_manage_a_custom_image_may_not_read_the_servers_files(server, owner):
    role(owner, "Image maker", "images:*")
    maker = user(owner, "ian", "Image maker")
    for text in ("-r /etc/passwd\n", "-c /etc/hostname\ntinyalpha\n", "/tmp/some.whl\n",
                 "./local/pkg\n"):
        err = error(maker.post("/api/images", json={"name": "ian/img", "requirements": text}),
                    422)
        assert err["code"] == "requirements_invalid", text
    assert "root:" not in "".join(maker.seen)


def test_a_custom_image_takes_private_packages_through_a_usable_identity(server, owner,
                                                                         wheelhouse):
    role(owner, "Image maker", "images:*")
    maker = user(owner, "ian", "Image maker")
    with LocalIndex(wheelhouse.directory, auth=tuple(FEED_SECRET.split(":"))) as private:
        assert owner.post("/api/identities", json={"name": "builder"}).status_code == 201
        r = owner.put(f"/api/identities/builder/feeds/{private.host}",
                      json={"secret": FEED_SECRET})
        assert r.status_code == 200 and r.json()["stored"] is True
        body = {"name": "ian/private", "identity": "builder",
                "requirements": f"-i http://{{private}}@{private.host}/simple\ntinysecret==1.0\n"}
        err = error(maker.post("/api/images", json=body), 403)
        assert err["scope"] == "identities:use:builder"
        assert error(maker.post("/api/images", json={**body, "identity": "nobody"}), 403)
        assert error(owner.post("/api/images", json={**body, "identity": "nobody"}), 404)

        role(owner, "Builder user", "identities:use:builder")
        assert owner.post("/api/role-assignments",
                          json={"user": "ian", "role": "Builder user"}).status_code == 201
        op = maker.wait(maker.post("/api/images", json=body).json())
        assert op["status"] == "succeeded", op
        assert "tinysecret==1.0" in op["result"]["layer_lock"]
        assert any(authorized for _m, _p, authorized in private.requests)
    assert not any(FEED_SECRET in text or "f33d-t0ken" in text for text in maker.seen)


# --- environments ----------------------------------------------------------------------------

def test_a_flows_environment_is_built_listed_shown_and_removed(server, owner, tmp_path):
    bob = user(owner, "bob", "Data Scientist")
    eve = user(owner, "eve", "Data Scientist")
    reader = user(owner, "rita", "Reader")
    register(bob, tmp_path, "tiny", "tinyalpha==1.0\n")

    before = bob.get("/api/flows/tiny/environment").json()
    assert before["built"] is False and before["environment"] is None
    assert before["requirements"] == ["tinyalpha==1.0"]
    err = error(bob.get("/api/flows/tiny/environment/packages"), 409)
    assert err["env_id"] == before["env_id"] and "build" in err["hint"]

    assert error(bob.post("/api/flows/tiny/environment/build", json={"refresh": "maybe"}),
                 422)["field"] == "refresh"
    assert error(eve.post("/api/flows/tiny/environment/build"), 404)["code"] == "not_found"
    assert error(eve.get("/api/flows/tiny/environment"), 404)["code"] == "not_found"
    assert error(eve.get("/api/flows/tiny/environment/packages"), 404)["code"] == "not_found"
    assert error(reader.post("/api/flows/tiny/environment/build"), 403)["scope"] == \
        "environments:write"

    r = bob.post("/api/flows/tiny/environment/build", json={})
    assert r.status_code == 202, r.text
    op = bob.wait(r.json())
    assert op["status"] == "succeeded", op
    env_id = op["result"]["id"]
    assert env_id == before["env_id"] and "holders" not in op["result"]

    packages = bob.get("/api/flows/tiny/environment/packages").json()
    assert {"name": "tinyalpha", "version": "1.0", "origin": "requirements"} in packages
    assert any(p["name"] == "promptflow-core" and p["origin"] == "image" for p in packages)
    assert bob.get("/api/flows/tiny/environment").json()["built"] is True
    assert env_id in [e["id"] for e in reader.get("/api/environments").json()]
    shown = reader.get(f"/api/environments/{env_id}").json()
    assert shown["state"] == "READY" and shown["refs"] == 0 and "holders" not in shown
    assert owner.get(f"/api/environments/{env_id}").json()["holders"] == []
    assert reader.get(f"/api/environments/{env_id}/packages").json() == packages
    assert error(reader.get("/api/environments/nope"), 404)["code"] == "not_found"

    assert error(reader.delete(f"/api/environments/{env_id}"), 403)
    assert bob.delete(f"/api/environments/{env_id}").json() == {"id": env_id, "removed": True}
    assert error(bob.get(f"/api/environments/{env_id}"), 404)
    assert error(bob.delete(f"/api/environments/{env_id}"), 404)
    actions = audit_actions(owner, "bob")
    assert ("POST /flows/{name}/environment/build", "ok") in actions
    assert ("DELETE /environments/{env_id}", "ok") in actions


# --- connections -----------------------------------------------------------------------------

def test_connections_are_created_shown_masked_and_deleted_by_their_owner(server, owner):
    role(owner, "Connector", "connections:*")
    bob = user(owner, "bob", "Data Scientist", "Connector")
    eve = user(owner, "eve", "Data Scientist", "Connector")
    reader = user(owner, "dan", "Reader")  # connections:read only

    body = {"name": "bob_openai", "type": "open_ai", "api_key": SECRET,
            "base_url": "http://127.0.0.1:9/v1"}
    r = bob.post("/api/connections", json=body)
    assert r.status_code == 201, r.text
    made = r.json()
    assert made["created"] is True and made["api_key"] == "******" and made["owner"] == "bob"
    r = bob.post("/api/connections", json={**body, "api_key": "******",
                                            "base_url": "http://127.0.0.1:10/v1"})
    assert r.status_code == 200 and r.json()["created"] is False
    assert r.json()["base_url"] == "http://127.0.0.1:10/v1"
    assert server[1].connections.for_executor(["bob_openai"], owner="bob")[
        "bob_openai"]["value"]["api_key"] == SECRET  # the update kept the secret
    custom = {"name": "bob_custom", "type": "custom", "configs": {"endpoint": "https://x",
                                                                  "retries": 3},
              "secrets": {"token": SECRET}}
    made = bob.post("/api/connections", json=custom).json()
    assert made["configs"] == {"endpoint": "https://x", "retries": "3"}
    assert made["secrets"] == {"token": "******"}

    assert error(bob.post("/api/connections", json={**body, "api_key": ["a"]}),
                 422)["field"] == "api_key"
    assert error(bob.post("/api/connections", json={**body, "name": 5}), 422)["field"] == "name"
    assert error(bob.post("/api/connections", json={**body, "colour": "red"}),
                 422)["field"] == "colour"
    assert error(bob.post("/api/connections", json={**body, "api_base": "https://x"}),
                 422)["field"] == "api_base"  # not a field of an open_ai connection
    err = error(bob.post("/api/connections", json={**body, "name": "from_env",
                                                    "api_key": "${env:HOME}"}), 422)
    assert err["field"] == "api_key" and "server" in err["message"]
    assert error(eve.post("/api/connections", json=body), 409)["code"] == "conflict"
    assert error(reader.post("/api/connections", json=body), 403)["scope"] == \
        "connections:write"

    assert [c["name"] for c in bob.get("/api/connections").json()] == ["bob_custom",
                                                                       "bob_openai"]
    assert eve.get("/api/connections").json() == []
    assert {c["name"] for c in owner.get("/api/connections").json()} == {"bob_custom",
                                                                          "bob_openai"}
    shown = bob.get("/api/connections/bob_openai").json()
    assert shown["api_key"] == "******" and shown["base_url"] == "http://127.0.0.1:10/v1"
    assert owner.get("/api/connections/bob_openai").status_code == 200
    assert error(eve.get("/api/connections/bob_openai"), 404)["code"] == "not_found"
    assert error(eve.delete("/api/connections/bob_openai"), 404)["code"] == "not_found"
    assert error(bob.get("/api/connections/nope"), 404)["code"] == "not_found"

    assert bob.delete("/api/connections/bob_openai").json()["deleted"] is True
    assert error(bob.get("/api/connections/bob_openai"), 404)
    assert owner.delete("/api/connections/bob_custom").json()["deleted"] is True
    actions = audit_actions(owner, "bob")
    assert ("POST /connections", "ok") in actions
    assert ("DELETE /connections/{name}", "ok") in actions
    assert ("DELETE /connections/{name}", "not_found") in audit_actions(owner, "eve")
    everything = "".join(bob.seen) + owner.get("/api/audit?limit=1000").text
    assert SECRET not in everything


# --- managed identities ----------------------------------------------------------------------

def test_identities_hold_feed_secrets_and_connections_but_never_show_a_secret(
        server, owner, caplog):
    role(owner, "Connector", "connections:*")
    role(owner, "Identity admin", "identities:*")
    bob = user(owner, "bob", "Data Scientist", "Connector")
    ida = user(owner, "ida", "Connector", "Identity admin")  # no all:manage
    scientist = user(owner, "dan", "Data Scientist")
    bob.post("/api/connections", json={"name": "team_openai", "type": "open_ai",
                                       "api_key": SECRET})
    ida.post("/api/connections", json={"name": "ida_conn", "type": "open_ai",
                                       "api_key": SECRET})

    assert error(owner.post("/api/identities", json={"name": 5}), 422)["field"] == "name"
    assert error(owner.post("/api/identities", json={"name": "x", "connections": "a"}),
                 422)["field"] == "connections"
    assert error(owner.post("/api/identities", json={"name": "user"}), 422)["field"] == "name"
    assert error(owner.post("/api/identities", json={"name": "bad name!"}), 422)["field"] == \
        "name"
    assert error(owner.post("/api/identities", json={"name": "x", "connections": ["nope"]}),
                 404)["code"] == "not_found"
    r = owner.post("/api/identities", json={"name": "team", "description": "the team's",
                                            "connections": ["team_openai"]})
    assert r.status_code == 201, r.text
    assert r.json()["connections"] == ["team_openai"] and r.json()["created_by"] == owner.name
    assert error(owner.post("/api/identities", json={"name": "team"}), 409)["code"] == "conflict"

    err = error(owner.put("/api/identities/team/feeds/pkgs.example.com", json={"secret": 123}),
                422)
    assert err["field"] == "secret"
    assert error(owner.put("/api/identities/team/feeds/pkgs.example.com", json={}),
                 422)["field"] == "secret"
    assert error(owner.put("/api/identities/team/feeds/pkgs.example.com", json={"secret": ""}),
                 422)["field"] == "secret"
    r = owner.put("/api/identities/team/feeds/PKGS.example.com", json={"secret": FEED_SECRET})
    assert r.json() == {"identity": "team", "host": "pkgs.example.com", "stored": True,
                        "feed_hosts": ["pkgs.example.com"]}
    owner.put("/api/identities/team/feeds/other.example.com:8080", json={"secret": "tok-only"})
    assert error(owner.put("/api/identities/ghost/feeds/h.example.com",
                           json={"secret": FEED_SECRET}), 404)["code"] == "not_found"

    listed = scientist.get("/api/identities").json()
    assert listed == [{"name": "team", "description": "the team's",
                       "connections": ["team_openai"],
                       "feed_hosts": ["other.example.com:8080", "pkgs.example.com"],
                       "created_by": owner.name, "created_at": listed[0]["created_at"],
                       "usable": False}]
    assert owner.get("/api/identities/team").json()["usable"] is True
    assert error(scientist.get("/api/identities/ghost"), 404)["code"] == "not_found"
    assert error(scientist.post("/api/identities", json={"name": "mine"}), 403)["scope"] == \
        "identities:write"

    # someone without all:manage gives access to their own connections only
    assert error(ida.put("/api/identities/team/connections",
                         json={"connections": ["team_openai", "ida_conn"]}), 404)
    r = ida.put("/api/identities/team/connections", json={"connections": ["ida_conn"]})
    assert r.json()["connections"] == ["ida_conn"]
    r = owner.put("/api/identities/team/connections",
                  json={"connections": ["ida_conn", "team_openai"]})
    assert r.json()["connections"] == ["ida_conn", "team_openai"]
    assert error(owner.put("/api/identities/team/connections", json={"connections": [1]}),
                 422)["field"].startswith("connections")

    # a deleted connection leaves the identity
    assert ida.delete("/api/connections/ida_conn").json()["identities"] == ["team"]
    assert owner.get("/api/identities/team").json()["connections"] == ["team_openai"]

    r = owner.delete("/api/identities/team/feeds/other.example.com:8080")
    assert r.json()["feed_hosts"] == ["pkgs.example.com"]
    assert error(owner.delete("/api/identities/team/feeds/other.example.com:8080"), 404)
    assert owner.delete("/api/identities/team").json() == {"name": "team", "deleted": True}
    assert error(owner.get("/api/identities/team"), 404)
    assert server[1].identities.secrets.hosts(identity="team") == {}  # its secrets went too

    actions = audit_actions(owner, owner.name)
    for action in ("POST /identities", "PUT /identities/{name}/feeds/{host}",
                   "PUT /identities/{name}/connections", "DELETE /identities/{name}/feeds/{host}",
                   "DELETE /identities/{name}"):
        assert (action, "ok") in actions, action
    assert ("PUT /identities/{name}/connections", "not_found") in audit_actions(owner, "ida")
    everything = "".join(owner.seen) + owner.get("/api/audit?limit=1000").text + caplog.text
    for secret in (SECRET, FEED_SECRET, "f33d-t0ken", "tok-only"):
        assert secret not in everything, secret


def test_an_identity_gives_the_connections_it_grants_to_its_users(server, owner):
    svc = server[1]
    role(owner, "Connector", "connections:*")
    alice = user(owner, "alice", "Connector")
    bob = user(owner, "bob", "Connector")
    alice.post("/api/connections", json={"name": "team_openai", "type": "open_ai",
                                         "api_key": SECRET})
    alice.post("/api/connections", json={"name": "alice_private", "type": "open_ai",
                                         "api_key": SECRET})
    bob.post("/api/connections", json={"name": "bob_own", "type": "custom",
                                       "secrets": {"token": "bob-token"}})
    owner.post("/api/identities", json={"name": "team", "connections": ["team_openai"]})

    conns = svc.connections
    assert conns.usable_names("bob") == {"bob_own"}
    assert conns.usable_names("bob", identity="user") == {"bob_own"}
    assert conns.usable_names("bob", identity="team") == {"bob_own", "team_openai"}
    assert conns.usable_names("bob", identity="ghost") == {"bob_own"}
    got = conns.for_executor_as(["team_openai", "bob_own"], owner="bob", identity="team")
    assert got["team_openai"]["value"]["api_key"] == SECRET
    assert got["team_openai"]["type"] == "OpenAIConnection"
    assert got["bob_own"]["value"] == {"token": "bob-token"}
    with pytest.raises(NotFound):
        conns.for_executor_as(["team_openai"], owner="bob", identity=None)
    with pytest.raises(NotFound):
        conns.for_executor_as(["alice_private"], owner="bob", identity="team")
    assert conns.for_executor_as(["bob_own"], owner="bob") == conns.for_executor(
        ["bob_own"], owner="bob")

    alice.delete("/api/connections/team_openai")
    assert conns.usable_names("bob", identity="team") == {"bob_own"}


def test_sessions_run_as_an_identity_only_with_identities_use(server, owner, tmp_path,
                                                              wheelhouse):
    bob = user(owner, "bob", "Data Scientist")
    with LocalIndex(wheelhouse.directory, auth=tuple(FEED_SECRET.split(":"))) as private:
        register(bob, tmp_path, "secretive",
                 f"-i http://{{private}}@{private.host}/simple\ntinysecret\n")
        owner.post("/api/identities", json={"name": "deploy"})
        owner.put(f"/api/identities/deploy/feeds/{private.host}", json={"secret": FEED_SECRET})

        err = error(bob.post("/api/flows/secretive/session", json={"identity": "deploy"}), 403)
        assert err["scope"] == "identities:use:deploy"
        assert ("POST /flows/{name}/session", "denied") in audit_actions(owner, "bob")
        assert error(owner.post("/api/flows/secretive/session", json={"identity": "ghost"}),
                     404)["code"] == "not_found"

        role(owner, "Deployer", "identities:use:deploy")
        owner.post("/api/role-assignments", json={"user": "bob", "role": "Deployer"})
        assert bob.get("/api/identities/deploy").json()["usable"] is True
        r = bob.post("/api/flows/secretive/session", json={"identity": "deploy"})
        assert r.status_code == 202, r.text
        op = bob.wait(r.json())
        assert op["status"] == "succeeded", op
        session = bob.get("/api/flows/secretive/session").json()
        assert session["state"] == "RUNNING" and session["identity"] == "deploy"
        assert any(authorized for _m, _p, authorized in private.requests)

        # what the session holds cannot go from under it
        err = error(owner.delete("/api/identities/deploy"), 409)
        assert err["sessions"] == [session["id"]]
        assert error(bob.delete(f"/api/environments/{session['env_id']}"), 409)["code"] == \
            "environment_in_use"

        assert bob.post("/api/flows/secretive/session/stop").status_code == 200
        assert owner.delete("/api/identities/deploy").status_code == 200
    assert not any(FEED_SECRET in text for text in bob.seen)


def test_a_run_as_a_managed_identity_uses_the_connection_it_gives_access_to(server, owner):
    """A real batch run: bob's flow names alice's connection, which only the identity gives
    him; without the identity the run is refused naming the connection, with it every line
    gets the connection's config, and its secret shows nowhere."""
    alice = user(owner, "alice", "Data Scientist")
    bob = user(owner, "bob", "Data Scientist")
    r = alice.post("/api/connections", json={"name": "my_custom", "type": "custom",
                                             "configs": {"greeting": "Hello"},
                                             "secrets": {"api_key": SECRET}})
    assert r.status_code in (200, 201), r.text
    owner.post("/api/identities", json={"name": "team", "connections": ["my_custom"]})
    role(owner, "Team member", "identities:use:team")
    owner.post("/api/role-assignments", json={"user": "bob", "role": "Team member"})
    files = {p.name: p.read_text() for p in (FLOWS / "connection_tool").iterdir()}
    assert bob.post("/api/flows", json={"name": "greeter", "files": files}).status_code == 201
    lines = [{"text": "world"}, {"text": "Ada"}]

    refused = bob.post("/api/runs", json={"flow": "greeter", "data_lines": lines})
    assert refused.status_code == 202, refused.text  # the session finds it missing
    bob.wait(refused.json()["operation"])
    plain = bob.get(f"/api/runs/{refused.json()['run']['name']}").json()
    assert plain["status"] == "Failed" and plain["completed"] == 0, plain
    assert "Connection 'my_custom' not found" in plain["error"], plain

    # the flow's session runs as bob: a run as the identity is not run on it as bob
    r = bob.post("/api/runs", json={"flow": "greeter", "data_lines": lines,
                                    "identity": "team"})
    assert r.status_code == 202, r.text
    op = bob.wait(r.json()["operation"])
    assert op["status"] == "failed" and op["error"]["field"] == "identity", op
    assert "runs with identity user, not team" in op["error"]["message"], op
    assert bob.post("/api/flows/greeter/session/stop").status_code == 200

    r = bob.post("/api/runs", json={"flow": "greeter", "data_lines": lines,
                                    "identity": "team"})
    assert r.status_code == 202, r.text
    op = bob.wait(r.json()["operation"])
    assert op["status"] == "succeeded", op
    name = r.json()["run"]["name"]
    run = bob.get(f"/api/runs/{name}").json()
    assert run["status"] == "Completed" and run["completed"] == 2, run
    outputs = bob.get(f"/api/runs/{name}/outputs").json()
    assert sorted(o["out"] for o in outputs) == ["Hello Ada", "Hello world"], outputs
    assert bob.get("/api/flows/greeter/session").json()["identity"] == "team"
    bob.get(f"/api/runs/{name}/logs"), bob.get(f"/api/runs/{name}/details")
    assert not any(SECRET in text for text in bob.seen)

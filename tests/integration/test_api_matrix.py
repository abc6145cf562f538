"""The permission matrix: every endpoint of the API x each role x own / another user's resource,
asserting allow or deny. A new endpoint that is not in ROUTES fails ``test_every_endpoint_is_in_
the_matrix``: nothing reaches the API without a decision here.

Roles: the Owner; alice and bob, Data Scientists (alice owns the resources); rita, a Reader;
uma, who holds only a custom role with ``roleAssignments:write``; and no token at all.
Denials come first (they change nothing); allowed writes are made on resources of their own.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from flowsession.api.app import bootstrap_admin, create_app
from flowsession.backends.compute import procs
from flowsession.config import Settings

FLOWS = Path(__file__).parent.parent / "flows"
pytestmark = pytest.mark.timeout(600)

# (method, path template, scope needed, owned): owned routes name alice's resource; for anyone
# but alice and the Owner it must be 404, exactly as if it did not exist.
ROUTES = [
    ("GET", "/api/me", None, False),
    ("GET", "/api/users", "users:read", False),
    ("POST", "/api/users", "users:write", False),
    ("POST", "/api/users/{user}/disable", "users:write", False),
    ("GET", "/api/tokens", None, False),
    ("POST", "/api/tokens", None, False),
    ("DELETE", "/api/tokens/{token_id}", None, True),
    ("GET", "/api/roles", None, False),
    ("POST", "/api/roles", "roles:write", False),
    ("DELETE", "/api/roles/{role}", "roles:write", False),
    ("POST", "/api/role-assignments", "roleAssignments:write", False),
    ("DELETE", "/api/role-assignments/{user}/{role}", "roleAssignments:write", False),
    ("GET", "/api/audit", "audit:read", False),
    ("GET", "/api/flows", "flows:read", False),
    ("POST", "/api/flows", "flows:write", False),
    ("GET", "/api/flows/{flow}", "flows:read", True),
    ("DELETE", "/api/flows/{flow}", "flows:write", True),
    ("GET", "/api/flows/{flow}/files/{file}", "flows:read", True),
    ("PUT", "/api/flows/{flow}/files/{file}", "flows:write", True),
    ("POST", "/api/flows/{flow}/test", "sessions:write", True),
    ("GET", "/api/sessions", "sessions:read", False),
    ("GET", "/api/flows/{flow}/session", "sessions:read", True),
    ("POST", "/api/flows/{flow}/session", "sessions:write", True),
    ("PATCH", "/api/flows/{flow}/session", "sessions:write", True),
    ("POST", "/api/flows/{flow}/session/install", "sessions:write", True),
    ("POST", "/api/flows/{flow}/session/reset", "sessions:write", True),
    ("POST", "/api/flows/{flow}/session/stop", "sessions:write", True),
    ("GET", "/api/flows/{flow}/session/events", "sessions:read", True),
    ("GET", "/api/flows/{flow}/session/packages", "sessions:read", True),
    ("GET", "/api/sessions/{session}", "sessions:read", True),
    ("PATCH", "/api/sessions/{session}", "sessions:write", True),
    ("POST", "/api/sessions/{session}/install", "sessions:write", True),
    ("POST", "/api/sessions/{session}/reset", "sessions:write", True),
    ("POST", "/api/sessions/{session}/stop", "sessions:write", True),
    ("GET", "/api/sessions/{session}/events", "sessions:read", True),
    ("GET", "/api/sessions/{session}/packages", "sessions:read", True),
    ("GET", "/api/sessions/{session}/logs", "sessions:read", True),
    ("GET", "/api/computes/sizes", "computes:read", False),
    ("GET", "/api/computes", "computes:read", False),
    ("POST", "/api/computes", "computes:write", False),
    ("GET", "/api/computes/{compute}", "computes:read", True),
    ("POST", "/api/computes/{compute}/start", "computes:write", True),
    ("POST", "/api/computes/{compute}/stop", "computes:write", True),
    ("DELETE", "/api/computes/{compute}", "computes:write", True),
    ("GET", "/api/runs", "runs:read", False),
    ("POST", "/api/runs", "runs:write", True),
    ("GET", "/api/runs/{run}", "runs:read", True),
    ("GET", "/api/runs/{run}/details", "runs:read", True),
    ("GET", "/api/runs/{run}/outputs", "runs:read", True),
    ("GET", "/api/runs/{run}/metrics", "runs:read", True),
    ("GET", "/api/runs/{run}/logs", "runs:read", True),
    ("POST", "/api/runs/{run}/cancel", "runs:write", True),
    ("GET", "/api/runs/{run}/events", "runs:read", True),
    ("GET", "/api/images", "images:read", False),
    ("POST", "/api/images", "images:write", False),
    ("GET", "/api/images/{image}", "images:read", False),
    ("POST", "/api/images/{image}/build", "images:write", False),
    ("GET", "/api/environments", "environments:read", False),
    ("GET", "/api/environments/{env}", "environments:read", False),
    ("GET", "/api/environments/{env}/packages", "environments:read", False),
    ("DELETE", "/api/environments/{env}", "environments:write", False),
    ("GET", "/api/flows/{flow}/environment", "environments:read", True),
    ("GET", "/api/flows/{flow}/environment/packages", "environments:read", True),
    ("POST", "/api/flows/{flow}/environment/build", "environments:write", True),
    ("GET", "/api/connections", "connections:read", False),
    ("POST", "/api/connections", "connections:write", False),
    ("GET", "/api/connections/{conn}", "connections:read", True),
    ("DELETE", "/api/connections/{conn}", "connections:write", True),
    ("GET", "/api/identities", "identities:read", False),
    ("POST", "/api/identities", "identities:write", False),
    ("GET", "/api/identities/{identity}", "identities:read", False),
    ("DELETE", "/api/identities/{identity}", "identities:write", False),
    ("PUT", "/api/identities/{identity}/connections", "identities:write", False),
    ("PUT", "/api/identities/{identity}/feeds/{host}", "identities:write", False),
    ("DELETE", "/api/identities/{identity}/feeds/{host}", "identities:write", False),
    ("GET", "/api/feeds", "environments:read", False),
    ("PUT", "/api/feeds/{host}", "environments:write", False),
    ("DELETE", "/api/feeds/{host}", "environments:write", False),
    ("GET", "/api/operations/{op}", None, True),
    ("GET", "/api/operations/{op}/events", None, True),
]
ROLE_SCOPES = {  # what each caller's roles grant (checked against the server's own answer)
    "alice": "Data Scientist", "bob": "Data Scientist", "rita": "Reader", "uma": "Assigner",
}


class World:
    """A server app with users, and alice's flow, compute instance, session, run and
    operation."""

    def __init__(self, settings: Settings):
        self.app = create_app(settings, background=False)
        self.client = TestClient(self.app).__enter__()
        self.tokens = {"owner": bootstrap_admin(self.app.state.services, None)}
        self.client.post("/api/roles", json={"name": "Assigner",
                                             "scopes": ["roleAssignments:write"]},
                         headers=self.h("owner"))
        for user, role in ROLE_SCOPES.items():
            r = self.client.post("/api/users", json={"name": user, "roles": [role]},
                                 headers=self.h("owner"))
            assert r.status_code == 201, r.text
            self.tokens[user] = r.json()["token"]
        self.scopes = {u: set(self.client.get("/api/me", headers=self.h(u)).json()["scopes"])
                       for u in self.tokens}
        files = {p.name: p.read_text() for p in (FLOWS / "echo").iterdir() if p.is_file()}
        assert self.post("alice", "/api/flows", {"name": "af", "files": files}).status_code == 201
        r = self.post("alice", "/api/computes", {"name": "abox", "size": "small"})
        assert r.status_code == 201, r.text
        r = self.post("alice", "/api/runs", {"flow": "af", "data": "data.jsonl"})
        assert r.status_code == 202, r.text
        self.run, self.op = r.json()["run"]["name"], r.json()["operation"]["id"]
        self.wait_op(self.op, "alice")
        self.token_id = self.client.get("/api/tokens", headers=self.h("alice")).json()[0]["id"]
        r = self.post("alice", "/api/connections", {"name": "aconn", "type": "custom",
                                                    "configs": {"k": "v"},
                                                    "secrets": {"s": "hush-123"}})
        assert r.status_code == 201, r.text
        r = self.post("owner", "/api/identities", {"name": "team-id"})
        assert r.status_code == 201, r.text
        r = self.client.get("/api/flows/af/environment", headers=self.h("alice"))
        assert r.status_code == 200, r.text
        self.env_id = r.json()["env_id"]
        r = self.client.get("/api/flows/af/session", headers=self.h("alice"))
        assert r.status_code == 200, r.text
        self.session_id = r.json()["id"]

    def h(self, who: str | None) -> dict:
        return {"Authorization": f"Bearer {self.tokens[who]}"} if who else {}

    def post(self, who, path, body=None):
        return self.client.post(path, json=body, headers=self.h(who))

    def wait_op(self, op: str, who: str) -> dict:
        """Follow the operation's server-sent events to its end."""
        events = []
        with self.client.stream("GET", f"/api/operations/{op}/events",
                                headers=self.h(who)) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
                if line.startswith("event: end"):
                    break
        result = self.client.get(f"/api/operations/{op}", headers=self.h(who)).json()
        assert result["status"] == "succeeded", (events, result)
        return result

    def path(self, template: str) -> str:
        return template.format(user="bob", token_id=self.token_id, role="Reader", flow="af",
                               file="echo.py", compute="abox", run=self.run, op=self.op,
                               image="flowsession/runtime:1", env=self.env_id, conn="aconn",
                               identity="team-id", host="pkgs.example.com",
                               session=self.session_id)


@pytest.fixture(scope="module")
def world(tmp_path_factory, images_dir, index):
    home = tmp_path_factory.mktemp("matrix") / "home"
    settings = Settings(home=home, images_path=images_dir, index_url=index.url)  # pool: default
    w = World(settings)
    yield w
    with contextlib.suppress(Exception):
        w.client.__exit__(None, None, None)
    for pid in procs.with_argument_under(str(settings.runtime_dir)):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(settings.runtime_dir, ignore_errors=True)


def _call(world: World, method: str, path: str, who: str | None, body=None):
    return world.client.request(method, path, headers=world.h(who), json=body)


def test_every_endpoint_is_in_the_matrix(world):
    schema = world.app.openapi()
    served = {(m.upper(), p) for p, ops in schema["paths"].items() for m in ops
              if p.startswith("/api") and p != "/api/health"}
    declared = {(m, _template(p)) for m, p, _, _ in ROUTES}
    served = {(m, _template(p)) for m, p in served}
    assert served - declared == set(), "endpoints without a decision in ROUTES"
    assert declared - served == set(), "ROUTES names endpoints the server does not have"


def _template(path: str) -> str:
    """'/api/flows/{name}/files/{path}' and '/api/flows/{flow}/files/{file}' compare equal."""
    return "/".join("{}" if part.startswith("{") else part for part in path.split("/"))


@pytest.mark.parametrize("method,template,scope,owned", ROUTES,
                         ids=[f"{m} {p}" for m, p, _, _ in ROUTES])
def test_no_token_is_401_without_detail(world, method, template, scope, owned):
    for headers in ({}, {"Authorization": "Bearer fs_000000000000_wrongwrongwrongwrongwrong"},
                    {"Authorization": "Basic abc"}):
        r = world.client.request(method, world.path(template), headers=headers)
        assert r.status_code == 401, (method, template, r.text)
        assert r.json()["error"]["message"] == "authentication required"


@pytest.mark.parametrize("method,template,scope,owned", ROUTES,
                         ids=[f"{m} {p}" for m, p, _, _ in ROUTES])
def test_callers_without_the_scope_get_403_naming_it(world, method, template, scope, owned):
    """A caller whose roles lack the scope is refused with 403 naming the scope (the README's
    promise), before anything is looked up: on another user's resource too, so the answer
    tells nothing of its existence. With the scope, another user's resource is 404."""
    for who in ("alice", "bob", "rita", "uma"):
        granted = _grants(world.scopes[who], scope)
        foreign = owned and who != "alice"
        if granted and not foreign:
            continue  # allowed: test_allowed_* below
        r = _call(world, method, world.path(template), who, body=_body(method, template))
        if granted and foreign:
            assert r.status_code == 404, (who, method, template, r.status_code, r.text)
        else:
            assert r.status_code == 403, (who, method, template, r.status_code, r.text)
            assert r.json()["error"]["scope"] == scope, r.text
            assert scope in r.json()["error"]["message"], r.text


def _grants(scopes: set[str], scope: str | None) -> bool:
    import fnmatch

    return scope is None or any(fnmatch.fnmatchcase(scope, g) for g in scopes)


def _body(method: str, template: str) -> dict | None:
    """A valid body, so that a refusal is about who asks, not what they send."""
    return {
        ("POST", "/api/users"): {"name": "zed"},
        ("POST", "/api/roles"): {"name": "R2", "scopes": ["runs:read"]},
        ("POST", "/api/role-assignments"): {"user": "bob", "role": "Reader"},
        ("POST", "/api/flows"): {"name": "zf", "files": {"flow.dag.yaml": "inputs: {}\n"}},
        ("PUT", "/api/flows/{flow}/files/{file}"): {"content": "x = 1\n"},
        ("POST", "/api/flows/{flow}/test"): {"inputs": {"text": "hi"}},
        ("POST", "/api/computes"): {"name": "zbox", "size": "small"},
        ("PATCH", "/api/flows/{flow}/session"): {"idle_time": "2h"},
        ("PATCH", "/api/sessions/{session}"): {"idle_time": "2h"},
        ("POST", "/api/runs"): {"flow": "af", "data": "data.jsonl"},
        ("POST", "/api/tokens"): {"label": "x"},
        ("POST", "/api/images"): {"name": "zimg", "base": "flowsession/runtime",
                                  "requirements": ""},
        ("POST", "/api/flows/{flow}/environment/build"): {},
        ("POST", "/api/connections"): {"name": "zc", "type": "custom", "configs": {"a": "b"}},
        ("POST", "/api/identities"): {"name": "zid"},
        ("PUT", "/api/identities/{identity}/connections"): {"connections": []},
        ("PUT", "/api/identities/{identity}/feeds/{host}"): {"secret": "t0ken"},
        ("PUT", "/api/feeds/{host}"): {"secret": "t0ken"},
    }.get((method, template))


READS = [(m, p) for m, p, s, o in ROUTES if m == "GET"]


@pytest.mark.parametrize("method,template", READS, ids=[f"{m} {p}" for m, p in READS])
def test_allowed_reads(world, method, template):
    """The owner of the resource, and the Owner role, read it."""
    scope = next(s for m, p, s, _ in ROUTES if (m, p) == (method, template))
    for who in ("alice", "owner"):
        if not _grants(world.scopes[who], scope):
            continue
        if template.endswith("/events"):
            with world.client.stream(method, world.path(template), headers=world.h(who)) as r:
                assert r.status_code == 200, (who, template)
            continue
        r = _call(world, method, world.path(template), who)
        assert r.status_code == 200, (who, method, template, r.status_code, r.text)


def test_lists_show_only_your_own_but_everything_to_the_owner(world):
    for path, key, mine in (("/api/flows", "name", "af"), ("/api/computes", "name", "abox"),
                            ("/api/runs", "name", world.run)):
        bob = [x[key] for x in _call(world, "GET", path, "bob").json()]
        owner = [x[key] for x in _call(world, "GET", path, "owner").json()]
        alice = [x[key] for x in _call(world, "GET", path, "alice").json()]
        assert mine not in bob and mine in owner and mine in alice, path


def test_allowed_writes_on_own_resources(world):
    """alice uses her write scopes on her own things; uma assigns roles and nothing else."""
    w = world
    assert w.client.put("/api/flows/af/files/notes.txt", json={"content": "hi"},
                        headers=w.h("alice")).status_code == 200
    r = w.post("alice", "/api/flows/af/test", {"inputs": {"text": "hi"}})
    assert r.status_code == 200 and r.json()["outputs"]["out"] == "hi", r.text
    assert w.client.patch("/api/flows/af/session", json={"idle_time": "2h"},
                          headers=w.h("alice")).status_code == 200
    assert w.post("alice", "/api/tokens", {"label": "second"}).status_code == 201
    assert w.post("uma", "/api/role-assignments", {"user": "bob", "role": "Reader"}
                  ).status_code == 201
    assert "Reader" in w.client.get("/api/me", headers=w.h("bob")).json()["roles"]
    assert w.client.delete("/api/role-assignments/bob/Reader",
                           headers=w.h("uma")).status_code == 200
    assert w.post("uma", "/api/users", {"name": "x1"}).status_code == 403  # only assignments
    r = w.post("alice", "/api/computes", {"name": "abox2", "size": "small"})
    assert r.status_code == 201
    assert w.client.delete("/api/computes/abox2", headers=w.h("alice")).status_code == 200


def test_owner_stops_another_users_compute_and_session(world):
    w = world
    r = w.post("owner", "/api/flows/af/session/stop")
    assert r.status_code == 200 and r.json()["state"] == "STOPPED", r.text
    assert w.post("owner", "/api/computes/abox/stop").json()["state"] == "STOPPED"
    assert w.post("alice", "/api/computes/abox/start").json()["state"] == "RUNNING"
    assert w.post("bob", "/api/computes/abox/stop").status_code == 404


def test_a_role_change_applies_to_the_next_request(world):
    w = world
    assert w.client.get("/api/audit", headers=w.h("rita")).status_code == 403
    w.post("owner", "/api/roles", {"name": "Auditor", "scopes": ["audit:read"]})
    w.post("owner", "/api/role-assignments", {"user": "rita", "role": "Auditor"})
    assert w.client.get("/api/audit", headers=w.h("rita")).status_code == 200
    w.client.delete("/api/role-assignments/rita/Auditor", headers=w.h("owner"))
    assert w.client.get("/api/audit", headers=w.h("rita")).status_code == 403


def test_a_revoked_token_is_401(world):
    w = world
    r = w.post("rita", "/api/tokens", {"label": "short-lived"})
    token, token_id = r.json()["token"], r.json()["id"]
    headers = {"Authorization": f"Bearer {token}"}
    assert w.client.get("/api/me", headers=headers).status_code == 200
    assert w.client.delete(f"/api/tokens/{token_id}", headers=headers).status_code == 200
    r = w.client.get("/api/me", headers=headers)
    assert r.status_code == 401 and r.json()["error"]["message"] == "authentication required"


def test_the_audit_log_says_who_did_what_with_what_result(world):
    w = world
    w.client.post("/api/computes", json={"name": "nope"}, headers=w.h("rita"))
    entries = w.client.get("/api/audit?limit=500", headers=w.h("owner")).json()
    denied = [e for e in entries if e["actor"] == "rita" and e["status"] == 403]
    assert denied and denied[0]["result"] == "denied"
    assert denied[0]["resource"] == "/api/computes"
    assert any(e["actor"] == "alice" and e["resource"] == "/api/runs" and e["result"] == "ok"
               for e in entries)


def test_malformed_json_and_wrong_types_name_the_field(world):
    w = world
    r = w.client.post("/api/computes", content=b"{", headers={
        **w.h("alice"), "content-type": "application/json"})
    assert r.status_code == 422 and "not valid JSON" in r.json()["error"]["message"]
    r = w.post("alice", "/api/runs", {"flow": "af", "workers": "many"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "workers"
    r = w.post("alice", "/api/computes", {"name": "c", "unknown": 1})
    assert r.status_code == 422 and r.json()["error"]["field"] == "unknown"


def test_an_operation_on_a_session_in_the_wrong_state_is_409_saying_the_state(world):
    w = world
    svc = w.app.state.services
    r = w.post("alice", "/api/flows/af/session")  # (again) RUNNING
    w.wait_op(r.json()["id"], "alice")
    session = svc.sessions.records.bound_to(svc.extra["flows"].get("af", owner="alice").path)
    svc.sessions.records.transition(session, "FAILED", actor="test", reason="broken on purpose")
    r = w.post("alice", "/api/flows/af/session/install")
    assert r.status_code == 409, r.text
    assert r.json()["error"]["state"] == "FAILED" and "FAILED" in r.json()["error"]["message"]
    w.post("alice", "/api/flows/af/session/stop")


def test_flow_names_are_per_user_so_a_name_tells_nothing(world):
    """bob may call his flow 'af' too: no 409 reveals alice's; each sees their own."""
    w = world
    files = {"flow.dag.yaml": (FLOWS / "echo" / "flow.dag.yaml").read_text(),
             "echo.py": (FLOWS / "echo" / "echo.py").read_text()}
    assert w.post("bob", "/api/flows", {"name": "af", "files": files}).status_code == 201
    assert w.client.get("/api/flows/af", headers=w.h("bob")).json()["owner"] == "bob"
    assert w.client.get("/api/flows/af", headers=w.h("alice")).json()["owner"] == "alice"
    r = w.client.get("/api/flows/alice:af", headers=w.h("bob"))
    assert r.status_code == 404
    assert w.client.get("/api/flows/bob:af", headers=w.h("owner")).json()["owner"] == "bob"
    assert w.client.delete("/api/flows/af", headers=w.h("bob")).status_code == 200
    assert w.client.get("/api/flows/af", headers=w.h("alice")).status_code == 200

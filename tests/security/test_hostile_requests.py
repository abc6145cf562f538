"""Hostile requests get a clean 4xx in the API's error shape, never a 500, and every refusal
is in the audit log: a body over the server's limit (FLOWSESSION_MAX_BODY, 64MB by default),
a NUL byte wherever a name or a path goes, a flow whose folder vanished."""

from __future__ import annotations

import shutil

import httpx
import pytest

pytestmark = pytest.mark.timeout(600)

LIMIT = 64 * 10**6  # the default FLOWSESSION_MAX_BODY
DAG = ("inputs:\n  x:\n    type: string\noutputs:\n  y:\n    type: string\n"
       "    reference: ${echo.output}\nnodes:\n- name: echo\n  type: python\n  source:\n"
       "    type: code\n    path: echo.py\n  inputs:\n    x: ${inputs.x}\n")
ECHO = "from promptflow.core import tool\n\n\n@tool\ndef echo(x: str) -> str:\n    return x\n"


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:500])
    error = r.json()["error"]
    assert {"code", "message", "hint"} <= set(error)
    return error


@pytest.fixture(scope="module")
def flow(dana) -> str:
    r = dana.post("/api/flows", json={"name": "target",
                                      "files": {"flow.dag.yaml": DAG, "echo.py": ECHO}})
    assert r.status_code == 201, r.text
    return "target"


def test_an_80_mb_upload_is_413_naming_the_limit(server, dana, tells_nothing):
    body = b'{"name": "huge", "files": {"flow.dag.yaml": "' + b"x" * (80 * 10**6) + b'"}}'
    r = tells_nothing(dana.post("/api/flows", content=body,
                                headers={"content-type": "application/json"}))
    error = error_of(r, 413)
    assert error["code"] == "payload_too_large" and error["limit"] == LIMIT
    assert "64.0 MB" in error["message"] and "FLOWSESSION_MAX_BODY" in error["hint"]
    assert dana.get("/api/flows/huge").status_code == 404
    assert httpx.get(f"{server.url}/api/health").json()["ok"]  # and the server is fine


def test_a_streamed_body_past_the_limit_is_413_too(dana, tells_nothing):
    """No Content-Length to trust: the bytes are counted as they come."""

    def chunks():
        yield b'{"name": "streamed", "files": {"flow.dag.yaml": "'
        for _ in range(66):
            yield b"y" * 10**6
        yield b'"}}'

    r = tells_nothing(dana.post("/api/flows", content=chunks(),
                                headers={"content-type": "application/json"}))
    assert error_of(r, 413)["limit"] == LIMIT
    assert dana.get("/api/flows/streamed").status_code == 404


NUL_REQUESTS = {
    "flow file path (read)": ("GET", "/api/flows/target/files/echo%00.py", None),
    "flow file path (save)": ("PUT", "/api/flows/target/files/a%00b.py", {"content": "x"}),
    "uploaded file name": ("POST", "/api/flows", {"name": "nul-files", "files": {
        "flow.dag.yaml": DAG, "echo.py": ECHO, "a\x00b.py": "x"}}),
    "flow name (URL)": ("GET", "/api/flows/tar%00get", None),
    "flow name (upload)": ("POST", "/api/flows", {"name": "ta\x00rget", "files": {
        "flow.dag.yaml": DAG}}),
    "flow name (run)": ("POST", "/api/runs", {"flow": "tar\x00get", "data": "d.jsonl"}),
    "run name (URL)": ("GET", "/api/runs/run%00one", None),
    "run name (submit)": ("POST", "/api/runs", {"flow": "target", "name": "run\x00one",
                                                 "data_lines": [{"x": "a"}]}),
    "data path": ("POST", "/api/runs", {"flow": "target", "data": "data\x00.jsonl"}),
    "include": ("POST", "/api/flows", {"name": "nul-include", "files": {
        "flow.dag.yaml": "additional_includes:\n- \"a\\0b\"\n" + DAG, "echo.py": ECHO}}),
    "session of a flow": ("POST", "/api/flows/tar%00get/session/stop", None),
    "query": ("GET", "/api/runs?max_results=5&flow=%00", None),
}


@pytest.mark.parametrize("where", list(NUL_REQUESTS))
def test_a_nul_byte_in_a_name_or_path_is_422_never_500(dana, flow, tells_nothing, where):
    method, url, body = NUL_REQUESTS[where]
    r = tells_nothing(dana.request(method, url, json=body))
    error = error_of(r, 422)
    assert error["code"] in ("invalid_input", "flow_file_invalid"), error


def test_a_path_no_file_system_takes_is_422_never_500(dana, flow, tells_nothing):
    for rel in ("a" * 300 + ".py", "dir/" + "b" * 256, "a%0Ab.py", "echo.py/inside"):
        r = tells_nothing(dana.put(f"/api/flows/target/files/{rel}", json={"content": "x"}))
        assert r.status_code == 422, (rel, r.text)
        r = tells_nothing(dana.get(f"/api/flows/target/files/{rel}"))
        assert r.status_code in (404, 422), (rel, r.text)


def test_every_refusal_is_in_the_audit_log(admin, dana, flow):
    dana.post("/api/flows", content=b"{" + b" " * (LIMIT + 1) + b"}",
              headers={"content-type": "application/json"})
    dana.get("/api/flows/target/files/audit%00me")
    dana.post("/api/flows", json={"name": "audited", "files": {
        "flow.dag.yaml": "additional_includes:\n- ../../../secret.key\n" + DAG}})
    dana.post("/api/flows", json={"name": "audited", "unknown": 1})
    dana.get("/api/runs/no-such-run")
    entries = [e for e in admin._http.request("GET", "/api/audit", params={"limit": 500,
                                                                        "actor": "dana"})]
    seen = {(e["action"], e["status"], e["detail"]) for e in entries}
    assert ("POST /api/flows", 413, "payload_too_large") in seen
    assert ("GET /api/flows/target/files/audit\\x00me", 422, "invalid_input") in seen
    assert ("POST /api/flows", 422, "flow_file_invalid") in seen
    assert ("POST /api/flows", 422, "invalid_input") in seen
    assert ("GET /api/runs/{name}", 404, "not_found") in seen
    assert all(e["actor"] == "dana" and e["result"] != "ok" for e in entries
               if e["status"] >= 400)


def test_a_flow_whose_folder_vanished_can_still_be_deleted(server, dana):
    r = dana.post("/api/flows", json={"name": "vanishing",
                                      "files": {"flow.dag.yaml": DAG, "echo.py": ECHO}})
    assert r.status_code == 201, r.text
    shutil.rmtree(server.home / "flows" / "dana" / "vanishing")
    r = dana.delete("/api/flows/vanishing")
    assert r.status_code == 200, r.text
    assert dana.get("/api/flows/vanishing").status_code == 404
    r = dana.post("/api/flows", json={"name": "vanishing",
                                      "files": {"flow.dag.yaml": DAG, "echo.py": ECHO}})
    assert r.status_code == 201, r.text  # the name is free again

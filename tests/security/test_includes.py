"""Includes stay inside what the user owns. dana, a Data Scientist, uploads flows whose
includes, symlinks or requirements reach for the server's own files (its token in
client.json, its secret.key, its database, /etc/passwd): each is refused naming the include,
and no answer holds the server's paths or a byte of those files. A local flow's includes
from outside its folder are bundled into the upload by the SDK and the CLI, and work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers.cli import FLOWSESSION

from flowsession.client import Client

pytestmark = pytest.mark.timeout(600)

DAG = """inputs:
  x:
    type: string
outputs:
  y:
    type: string
    reference: ${echo.output}
nodes:
- name: echo
  type: python
  source:
    type: code
    path: echo.py
  inputs:
    x: ${inputs.x}
"""
ECHO = "from promptflow.core import tool\n\n\n@tool\ndef echo(x: str) -> str:\n    return x\n"
CLIMBS = ["../../../client.json", "../../../secret.key", "../../../flowsession.db",
          "/etc/passwd"]


def flow_files(*includes: str, **more: str) -> dict[str, str]:
    listed = "".join(f"- {inc}\n" for inc in includes)
    dag = (f"additional_includes:\n{listed}" if includes else "") + DAG
    return {"flow.dag.yaml": dag, "echo.py": ECHO, **more}


def upload(dana, name: str, files: dict[str, str]):
    return dana.post("/api/flows", json={"name": name, "files": files})


@pytest.mark.parametrize("include", CLIMBS)
def test_include_climbing_out_of_upload_is_refused_without_server_paths(
        server, dana, tells_nothing, include):
    r = tells_nothing(upload(dana, "climber", flow_files("echo.py", include)))
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "flow_file_invalid"
    assert error["field"] == "additional_includes[1]" and error["file"] == "flow.dag.yaml"
    assert f"'{include}'" in error["message"] and "outside the uploaded flow" in error["message"]
    assert "climber" not in [f["name"] for f in dana.get("/api/flows").json()]
    assert not (server.home / "flows" / "dana" / "climber").exists()


@pytest.mark.parametrize("include", CLIMBS)
def test_saving_a_flow_file_whose_include_climbs_out_is_refused(dana, tells_nothing, include):
    assert upload(dana, "saver", flow_files()).status_code in (201, 409)
    r = tells_nothing(dana.put("/api/flows/saver/files/flow.dag.yaml",
                               json={"content": flow_files(include)["flow.dag.yaml"]}))
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "additional_includes[0]"
    assert dana.get("/api/flows/saver/files/flow.dag.yaml").json()["content"] == DAG


def test_symlink_out_of_an_upload_is_refused_without_saying_where_it_leads(
        server, dana, tells_nothing):
    """An upload is text files: the API cannot make a symlink. One planted in the flow's
    folder on the server (a restored backup, a process of the machine) is still refused."""
    assert upload(dana, "linked", flow_files()).status_code == 201
    folder = server.home / "flows" / "dana" / "linked"
    (folder / "key.txt").symlink_to(server.home / "secret.key")
    r = tells_nothing(dana.get("/api/flows/linked/files/key.txt"))
    assert r.status_code == 422 and "symlink" in r.json()["error"]["message"], r.text
    r = tells_nothing(dana.put("/api/flows/linked/files/key.txt", json={"content": "x"}))
    assert r.status_code == 422, r.text
    r = tells_nothing(dana.get("/api/flows/linked/environment"))  # makes its snapshot
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["file"] == "key.txt" and "leads outside the uploaded flow" in error["message"]
    (folder / "key.txt").unlink()
    (folder / "shared").symlink_to(server.home, target_is_directory=True)
    r = tells_nothing(dana.post("/api/flows/linked/test", json={"inputs": {"x": "a"}}))
    assert r.status_code == 422, r.text
    assert r.json()["error"]["file"] == "shared"


def test_an_included_folder_that_is_a_symlink_out_is_refused(server, dana, tells_nothing):
    assert upload(dana, "inclink", flow_files("common")).status_code == 422  # no such folder
    r = upload(dana, "inclink", flow_files("_includes/lib",
                                           **{"_includes/lib/util.py": "X = 1\n"}))
    assert r.status_code == 201, r.text
    folder = server.home / "flows" / "dana" / "inclink" / "_includes"
    shutil.rmtree(folder / "lib")
    (folder / "lib").symlink_to(server.home, target_is_directory=True)
    r = tells_nothing(dana.get("/api/flows/inclink/environment"))
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["field"] == "additional_includes[0]" and "'_includes/lib'" in error["message"]


def test_requirements_of_an_upload_cannot_read_the_servers_files(dana, tells_nothing):
    files = flow_files(**{"requirements.txt": "-r ../../secret.key\n"})
    files["flow.dag.yaml"] = ("environment:\n  python_requirements_txt: requirements.txt\n"
                              + files["flow.dag.yaml"])
    assert upload(dana, "reqs", files).status_code == 201
    r = tells_nothing(dana.get("/api/flows/reqs/environment"))
    assert r.status_code == 422, r.text
    assert "leads outside the uploaded flow" in r.json()["error"]["message"]


def test_no_answer_to_the_attacks_names_a_server_path_or_a_secret(server, dana, tells_nothing):
    """Every answer dana gets while attacking, errors and operations included, is scanned."""
    answers = [upload(dana, f"scan{i}", flow_files(inc)) for i, inc in enumerate(CLIMBS)]
    answers.append(upload(dana, "scan-sub", flow_files("sub/../../../../secret.key")))
    answers.append(dana.get("/api/flows/scan-none/files/x"))
    answers.append(dana.get("/api/flows/dana:nope/environment"))
    assert upload(dana, "scan-ok", flow_files()).status_code == 201
    folder = server.home / "flows" / "dana" / "scan-ok"
    (folder / "db.txt").symlink_to(server.home / "flowsession.db")
    answers.append(dana.get("/api/flows/scan-ok/files/db.txt"))
    answers.append(dana.get("/api/flows/scan-ok/environment"))
    op = dana.post("/api/flows/scan-ok/environment/build", json={})
    answers.append(op)
    if op.status_code == 202:
        with dana.stream("GET", f"/api/operations/{op.json()['id']}/events") as events:
            events.read()
            answers.append(events)
        answers.append(dana.get(f"/api/operations/{op.json()['id']}"))
        assert answers[-1].json()["status"] == "failed"
    answers.append(dana.post("/api/runs", json={"flow": "scan-ok", "data": "../../x.jsonl"}))
    answers.append(dana.post("/api/runs", json={"flow": "scan-ok", "data": "nope.jsonl"}))
    refused = [a for a in answers if a.request.method != "GET" or "/operations/" not in
               str(a.request.url)]
    assert all(a.status_code >= 400 for a in refused if a is not op), \
        [a.text for a in refused]
    for answer in answers:
        tells_nothing(answer)


# --- what the SDK and the CLI upload ----------------------------------------------------------


def local_flow_with_includes(root: Path, name: str) -> Path:
    """A flow whose requirements and code come from beside it, as prompt flow allows."""
    (root / "requirements.txt").write_text("tinyalpha==1.0\n")
    (root / "shared_code").mkdir(parents=True)
    (root / "shared_code" / "__init__.py").write_text("")
    (root / "shared_code" / "words.py").write_text(
        "def shout(text):\n    return text.upper() + '!'\n")
    flow = root / name
    flow.mkdir()
    (flow / "flow.dag.yaml").write_text(
        "environment:\n  python_requirements_txt: requirements.txt\n"
        "additional_includes:\n- ../requirements.txt\n- ../shared_code/\n" + DAG)
    (flow / "echo.py").write_text(
        "import tinyalpha\nfrom promptflow.core import tool\n\nfrom shared_code.words import "
        "shout\n\n\n@tool\ndef echo(x: str) -> str:\n"
        "    return f'{shout(x)} with tinyalpha {tinyalpha.__version__}'\n")
    return flow


def test_sdk_upload_of_a_local_flow_brings_its_includes_and_they_work(
        server, dana_token, tmp_path):
    flow = local_flow_with_includes(tmp_path, "with_includes")
    try:
        with Client(url=server.url, token=dana_token) as c:
            assert c.test(flow, {"x": "hi"}) == {"y": "HI! with tinyalpha 1.0"}
            assert c.read_flow_file("with_includes", "_includes/requirements.txt") == \
                "tinyalpha==1.0\n"
            dag = c.read_flow_file("with_includes", "flow.dag.yaml")
            assert '"_includes/requirements.txt"' in dag and '"_includes/shared_code"' in dag
        (tmp_path / "shared_code" / "words.py").write_text(
            "def shout(text):\n    return text.upper() + '!!'\n")
        with Client(url=server.url, token=dana_token) as c:  # the next use saves the change
            assert c.test(flow, {"x": "hi"}) == {"y": "HI!! with tinyalpha 1.0"}
    finally:
        with Client(url=server.url, token=dana_token) as c:
            c.stop_session("with_includes")


def test_cli_upload_of_a_local_flow_brings_its_includes(server, dana_token, tmp_path):
    flow = local_flow_with_includes(tmp_path, "cli_includes")
    env = {**os.environ, "FLOWSESSION_URL": server.url, "FLOWSESSION_TOKEN": dana_token,
           "FLOWSESSION_HOME": str(tmp_path / "client-home")}
    done = subprocess.run([FLOWSESSION, "env", "packages", str(flow), "--json"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    packages = json.loads(done.stdout)
    assert {"name": "tinyalpha", "version": "1.0", "origin": "requirements"} in packages

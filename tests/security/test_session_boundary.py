"""The session boundary, attacked for real: a Data Scientist's flow code on a real server, in
a real (sandboxed) session, tries to reach the server's secrets and another user's session.

The attacker (bob) knows the server's layout (it is open source) and plants, in the folders his
session can write, symlinks to the server's secret key, the Owner's ``client.json`` and the
database: as his run's worker logs, as results files, as the files the control plane once wrote
there, and as the session's exit and status files; then he kills his own supervisor, floods his
log, and returns outputs too large to store. Each attack must fail, and no byte of a secret may
appear in any answer he gets, in his run's files or in the server's log.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest

from flowsession.backends.compute import sandbox
from flowsession.config import Settings
from helpers.server import Server, serving

pytestmark = [pytest.mark.timeout(600),
              pytest.mark.skipif(sandbox.bwrap_path() is None and not os.environ.get("CI"),
                                 reason="the session boundary needs bubblewrap")]

ATTACK_YAML = """\
inputs:
  targets: {type: string}
  mode: {type: string, default: plant}
outputs:
  out: {type: string, reference: "${attack.output}"}
nodes:
- name: attack
  type: python
  source: {type: code, path: attack.py}
  inputs: {targets: "${inputs.targets}", mode: "${inputs.mode}"}
- name: summary
  type: python
  source: {type: code, path: summary.py}
  inputs: {outs: "${attack.output}"}
  aggregation: true
"""

ATTACK_PY = '''\
import glob, os, signal, sys
from promptflow.core import tool

STATE = "/session/state"


def plant(link, target):
    try:
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink(target, link)
    except OSError:
        pass


@tool
def attack(targets: str, mode: str) -> str:
    targets = targets.split("|")
    if mode == "read":  # straight at the server's files, and another session's
        found = []
        for t in targets:
            try:
                with open(t, "rb") as f:
                    found.append(t + " READ " + f.read(64).hex())
            except OSError as exc:
                found.append(t + " denied " + type(exc).__name__)
        for t in targets:  # the test checks that the server's files did not change
            try:
                with open(t, "ab") as f:
                    f.write(b"pwned")
            except OSError:
                pass
        for d in (sys.prefix, os.path.dirname(os.__file__)):
            try:
                open(os.path.join(d, "planted.txt"), "w").close()
                found.append(d + " WRITABLE")
            except OSError:
                pass
        return "\\n".join(found)
    if mode == "flood":
        chunk = "x" * 1023 + "\\n"
        for _ in range(70 * 1024):
            sys.stdout.write(chunk)
        sys.stdout.flush()
        return "flooded"
    if mode == "huge":
        return "y" * (9 * 1024 * 1024)
    if mode == "junk":  # records of no line, and lines that are not records
        for run in glob.glob(STATE + "/runs/*"):
            with open(run + "/results.junk.jsonl", "w") as f:
                for i in range(12000):
                    f.write('{"i": -%d, "ok": true}\\n' % (i + 1) if i % 2 else "not json\\n")
        return "junk"
    for i, t in enumerate(targets):
        for run in glob.glob(STATE + "/runs/*"):
            os.makedirs(run + "/logs", exist_ok=True)
            plant(f"{run}/logs/evil{i}.log", t)
            plant(f"{run}/results.evil{i}.jsonl", t)
            for name in ("all.records", "status.json", "inputs.jsonl.evil"):
                plant(f"{run}/{name}", t)
            try:
                os.mkfifo(f"{run}/results.fifo{i}.jsonl")
            except OSError:
                pass
        plant(f"{STATE}/exit.json", t)
        plant(f"{STATE}/status.json", t)
        plant(f"{STATE}/supervisor.log", t)
        plant(f"{STATE}/s.sock", t)
    if mode == "kill":
        os.kill(os.getppid(), signal.SIGKILL)  # the supervisor (a test line's parent)
    return "planted"
'''

SUMMARY_PY = '''\
from promptflow.core import log_metric, tool


@tool
def summary(outs: list) -> dict:
    log_metric("lines", len(outs))
    return {"lines": len(outs)}
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory, images_dir, index):
    home = tmp_path_factory.mktemp("boundary") / "home"
    with serving(home, images_dir, index.url) as srv:
        yield srv



def api(srv: Server, token: str) -> httpx.Client:
    return httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {token}"},
                        timeout=300)


class Attacker:
    """bob, a Data Scientist: every answer he gets is kept, to look for secrets in."""

    def __init__(self, srv: Server, token: str):
        self.http = api(srv, token)
        self.seen: list[str] = []

    def call(self, method: str, path: str, **kw) -> httpx.Response:
        r = self.http.request(method, path, **kw)
        self.seen.append(r.text)
        return r

    def wait_operation(self, answer: httpx.Response) -> dict:
        body = answer.json()
        op = body.get("operation") or body  # a run's answer holds its operation
        deadline = time.monotonic() + 300
        while op.get("id") and op.get("status") not in ("succeeded", "failed"):
            assert time.monotonic() < deadline, op
            time.sleep(0.2)
            op = self.call("GET", f"/api/operations/{op['id']}").json()
        return op


@pytest.fixture(scope="module")
def bob(server) -> Attacker:
    with api(server, server.token) as admin:
        # the Owner keeps a secret: the server's key exists from here on
        r = admin.post("/api/connections", json={"name": "owner_openai", "type": "custom",
                                                 "secrets": {"key": "sk-owner-secret-0123"}})
        assert r.status_code in (200, 201), r.text
        r = admin.post("/api/users", json={"name": "bob", "roles": ["Data Scientist"]})
        assert r.status_code == 201, r.text
        token = r.json()["token"]
    attacker = Attacker(server, token)
    r = attacker.call("POST", "/api/flows", json={"name": "attack", "files": {
        "flow.dag.yaml": ATTACK_YAML, "attack.py": ATTACK_PY, "summary.py": SUMMARY_PY}})
    assert r.status_code == 201, r.text
    return attacker


def secrets_of(srv: Server) -> dict[str, bytes]:
    """What must never reach bob: the key, the Owner's token, the database's header."""
    home = srv.home
    return {"secret.key": (home / "secret.key").read_bytes().strip(),
            "token": srv.token.encode(),
            "client.json": (home / "client.json").read_bytes().strip(),
            "connection": b"sk-owner-secret-0123"}


def targets(srv: Server) -> str:
    home = srv.home
    return "|".join(str(home / n) for n in ("secret.key", "client.json", "flowsession.db"))


def assert_no_secret(srv: Server, texts: list[str | bytes], where: str) -> None:
    for name, secret in secrets_of(srv).items():
        for text in texts:
            data = text.encode() if isinstance(text, str) else text
            assert secret not in data, f"{name} leaked into {where}"
            assert secret.hex().encode() not in data, f"{name} (hex) leaked into {where}"


def fingerprint(srv: Server) -> dict[str, tuple[bytes, int]]:
    return {n: ((srv.home / n).read_bytes(), (srv.home / n).stat().st_mtime_ns)
            for n in ("secret.key", "client.json")}


def test_planted_symlinks_in_a_run_leak_nothing_and_overwrite_nothing(server, bob):
    before = fingerprint(server)
    lines = [{"targets": targets(server), "mode": "plant"} for _ in range(6)]
    r = bob.call("POST", "/api/runs", json={
        "flow": "attack", "data_lines": lines, "name": "plant-run",
        "column_mapping": {"targets": "${data.targets}", "mode": "${data.mode}"}})
    assert r.status_code == 202, r.text
    bob.wait_operation(r)
    run = bob.call("GET", "/api/runs/plant-run").json()
    # the run itself is unharmed: every line ran once, the aggregation ran
    assert run["status"] == "Completed", run
    assert (run["completed"], run["failed"]) == (6, 0)
    assert bob.call("GET", "/api/runs/plant-run/metrics").json() == {"lines": 6}
    logs = bob.call("GET", "/api/runs/plant-run/logs")
    assert logs.status_code == 200
    for path in ("/api/runs/plant-run/details", "/api/runs/plant-run/outputs",
                 "/api/runs/plant-run"):
        assert bob.call("GET", path).status_code == 200
    # nothing the symlinks point at was read into an answer, or written to
    assert fingerprint(server) == before
    run_files = [p.read_bytes() for p in (server.home / "runs" / "plant-run").rglob("*")
                 if p.is_file() and not p.is_symlink()]
    assert_no_secret(server, bob.seen, "bob's answers")
    assert_no_secret(server, run_files, "the run's files")
    # the only server paths bob is told are those of his own flow folders
    assert run["spec"]["data"] == "data_lines"
    home = str(server.home)
    for text in bob.seen:
        rest = text.replace(f"{home}/flows/bob/", "")
        for mine in targets(server).split("|"):  # what he sent himself
            rest = rest.replace(mine, "")
        assert home not in rest, rest[max(0, rest.find(home) - 200):rest.find(home) + 200]
    assert_no_secret(server, [server.log.read_bytes()], "the server's log")


def test_a_killed_supervisor_with_planted_exit_files_leaks_nothing(server, bob):
    r = bob.call("POST", "/api/flows/attack/test",
                 json={"inputs": {"targets": targets(server), "mode": "kill"}})
    assert r.status_code in (409, 422), r.text  # the line's session died under it
    deadline = time.monotonic() + 60
    while True:
        shown = bob.call("GET", "/api/flows/attack/session").json()
        if shown["state"] in ("FAILED", "STOPPED"):
            break
        assert time.monotonic() < deadline, shown
        time.sleep(0.5)
    assert shown["reason"], shown
    assert_no_secret(server, bob.seen, "bob's answers")
    assert_no_secret(server, [server.log.read_bytes()], "the server's log")
    # and bob can start over: reset gives him a working session
    r = bob.call("POST", "/api/flows/attack/session/reset")
    assert r.status_code == 202, r.text
    assert bob.wait_operation(r)["status"] == "succeeded"
    r = bob.call("POST", "/api/flows/attack/test",
                 json={"inputs": {"targets": "/nonexistent", "mode": "plant"}})
    assert r.status_code == 200 and r.json()["outputs"] == {"out": "planted"}, r.text


def test_flow_code_cannot_read_the_servers_files_or_another_users_session(server, bob):
    # alice, another Data Scientist, has a session with a file in its working directory
    with api(server, server.token) as admin:
        r = admin.post("/api/users", json={"name": "alice", "roles": ["Data Scientist"]})
        alice = api(server, r.json()["token"])
    marker_py = ("from promptflow.core import tool\n\n@tool\ndef mark(x: str) -> str:\n"
                 "    open('alice-private.txt', 'w').write('alice secret ' + x)\n"
                 "    import os\n    return os.path.abspath('alice-private.txt')\n")
    marker_yaml = ("inputs:\n  x: {type: string}\noutputs:\n  out: {type: string, reference: "
                   "\"${mark.output}\"}\nnodes:\n- name: mark\n  type: python\n  source: "
                   "{type: code, path: mark.py}\n  inputs: {x: \"${inputs.x}\"}\n")
    r = alice.post("/api/flows", json={"name": "mark", "files": {
        "flow.dag.yaml": marker_yaml, "mark.py": marker_py,
        "requirements.txt": "tinysecret\n"}})  # her environment has a package of its own
    assert r.status_code == 201, r.text
    r = alice.post("/api/flows/mark/test", json={"inputs": {"x": "42"}})
    assert r.status_code == 200, r.text
    runtime = Settings(home=server.home).runtime_dir
    alice_files = [str(p) for p in runtime.glob("slots/*/work/alice-private.txt")]
    assert alice_files, "alice's session wrote no file"
    home = server.home
    alice_packages = [str(p) for p in home.glob("envs/*/lib/python*/site-packages/tinysecret*/*")
                      if p.is_file()]
    assert alice_packages, "alice's environment has no package of its own"
    alice_files += alice_packages[:2]
    wanted = [str(home / "secret.key"), str(home / "client.json"), str(home / "flowsession.db"),
              *alice_files, f"{runtime}/control", "/etc/shadow"]
    before = fingerprint(server)
    alice_before = [Path(p).read_bytes() for p in alice_files]
    r = bob.call("POST", "/api/flows/attack/test",
                 json={"inputs": {"targets": "|".join(wanted), "mode": "read"}})
    assert r.status_code == 200, r.text
    report = r.json()["outputs"]["out"]
    assert " READ " not in report and "WRITABLE" not in report, report
    assert report.count(" denied ") == len(wanted), report
    # what he wrote to those paths went into his own sandbox, not to the files
    assert fingerprint(server) == before
    assert [Path(p).read_bytes() for p in alice_files] == alice_before
    assert b"pwned" not in (server.home / "flowsession.db").read_bytes()
    alice.close()


def test_a_session_that_floods_its_log_is_stopped_with_the_reason(server, bob):
    r = bob.call("POST", "/api/flows/attack/test",
                 json={"inputs": {"targets": "-", "mode": "flood"}})
    # cut off while the line still runs, or found at the next look: either way, said why
    assert r.status_code == 200 or "more than 64 MB to its log" in r.text, r.text
    deadline = time.monotonic() + 60
    while True:  # show reconciles: the next look at the session finds the flood
        shown = bob.call("GET", "/api/flows/attack/session")
        if shown.status_code == 404 or shown.json()["state"] == "STOPPED":
            break
        assert time.monotonic() < deadline, shown.text
        time.sleep(0.5)
    events = bob.call("GET", "/api/flows/attack/session/events").json()
    assert any("more than 64 MB to its log" in (e["reason"] or "") for e in events), events
    assert httpx.get(f"{server.url}/api/health").status_code == 200


def test_an_output_too_large_to_store_fails_its_line_only(server, bob):
    lines = [{"targets": "-", "mode": m} for m in ("plant", "huge", "plant")]
    r = bob.call("POST", "/api/runs", json={
        "flow": "attack", "data_lines": lines, "name": "huge-run",
        "column_mapping": {"targets": "${data.targets}", "mode": "${data.mode}"}})
    assert r.status_code == 202, r.text
    bob.wait_operation(r)
    run = bob.call("GET", "/api/runs/huge-run").json()
    assert (run["status"], run["completed"], run["failed"]) == ("Completed", 2, 1), run
    details = bob.call("GET", "/api/runs/huge-run/details").json()
    failed = [d for d in details if d["status"] == "Failed"]
    assert [d["line_number"] for d in failed] == [1]
    assert "too large to store" in failed[0]["error"]
    outputs = bob.call("GET", "/api/runs/huge-run/outputs").json()
    assert [o["line_number"] for o in outputs] == [0, 2]


def test_a_session_sending_junk_records_has_its_run_stopped_with_the_reason(server, bob):
    lines = [{"targets": "-", "mode": m} for m in ("junk", "plant", "plant")]
    r = bob.call("POST", "/api/runs", json={
        "flow": "attack", "data_lines": lines, "name": "junk-run",
        "column_mapping": {"targets": "${data.targets}", "mode": "${data.mode}"}})
    assert r.status_code == 202, r.text
    bob.wait_operation(r)
    run = bob.call("GET", "/api/runs/junk-run").json()
    assert run["status"] == "Failed", run
    assert "records that are not valid data" in run["error"], run
    # what was valid was kept, each line once
    details = bob.call("GET", "/api/runs/junk-run/details").json()
    assert [d["line_number"] for d in details] == [0, 1, 2]
    assert httpx.get(f"{server.url}/api/health").status_code == 200


ENV_WRITE_PY = '''\
import errno, os, site, sys
from promptflow.core import tool


@tool
def attack(targets: str, mode: str) -> str:
    """Write into what the session runs from: its environment's packages, its interpreter,
    the image's standard library; each attempt reports the errno that stopped it."""
    places = [*site.getsitepackages(), os.path.join(sys.prefix, "bin"),
              os.path.dirname(os.__file__), os.path.dirname(os.path.realpath(sys.executable))]
    import promptflow
    places.append(os.path.dirname(promptflow.__file__))
    found = []
    for d in places:
        try:
            with open(os.path.join(d, "planted.py"), "w") as f:
                f.write("pwned")
            found.append(d + " WRITABLE")
        except OSError as exc:
            found.append(d + " held " + errno.errorcode.get(exc.errno, str(exc.errno)))
    try:
        with open(os.__file__, "a") as f:
            f.write("# pwned")
        found.append(os.__file__ + " WRITABLE")
    except OSError as exc:
        found.append(os.__file__ + " held " + errno.errorcode.get(exc.errno, str(exc.errno)))
    return "\\n".join(found)
'''

MEMORY_PY = '''\
from promptflow.core import tool


@tool
def attack(targets: str, mode: str) -> str:
    """Take 3 GB, a page at a time (the session's VM size has 2 GB)."""
    chunks = []
    for _ in range(3 * 1024):
        chunk = bytearray(1024 * 1024)
        chunk[::4096] = b"x" * len(chunk[::4096])
        chunks.append(chunk)
    return "took 3 GB"
'''


def _attack_flow(bob: Attacker, name: str, code: str) -> None:
    yaml = ATTACK_YAML.split("- name: summary")[0]  # the attack node alone
    r = bob.call("POST", "/api/flows", json={"name": name, "files": {
        "flow.dag.yaml": yaml, "attack.py": code}})
    assert r.status_code == 201, r.text


def test_flow_code_cannot_write_into_its_environment_and_is_told_what_held(server, bob):
    _attack_flow(bob, "envwrite", ENV_WRITE_PY)
    r = bob.call("POST", "/api/flows/envwrite/test", json={"inputs": {"targets": "-"}})
    assert r.status_code == 200, r.text
    report = r.json()["outputs"]["out"].splitlines()
    assert len(report) >= 5, report
    assert not [line for line in report if "WRITABLE" in line], report
    # a read-only mount (EROFS) or no permission (EACCES): the sandbox's, named by errno
    assert all(line.rsplit(" ", 1)[1] in ("EROFS", "EACCES") for line in report), report
    home = server.home
    assert not list(home.glob("envs/**/planted.py")) and not list(home.glob("images/**/planted.py"))
    assert bob.call("POST", "/api/flows/envwrite/session/stop").status_code == 200


def test_flow_code_over_its_vm_sizes_memory_is_stopped_by_the_limit(server, bob):
    """A `small` session (2 GB): a line that takes 3 GB fails -- its worker is killed or gets
    MemoryError -- and the session shows the limit it runs under. Run after another start,
    so that it adopts the standby pool's warm supervisor (which must be under the limit too)."""
    _attack_flow(bob, "hog", MEMORY_PY)
    r = bob.call("POST", "/api/flows/hog/session", json={"vm_size": "small"})
    assert bob.wait_operation(r)["status"] == "succeeded", r.text
    shown = bob.call("GET", "/api/flows/hog/session").json()
    assert "2.0 GB" in str(shown.get("limits")) or "2 GB" in str(shown.get("limits")), shown
    r = bob.call("POST", "/api/flows/hog/test", json={"inputs": {"targets": "-"}})
    assert r.status_code != 200 or "took 3 GB" not in r.text, (r.text, shown)
    said = r.text
    # the line's error names the limit that held and the size, not only "killed by SIGKILL"
    assert "memory limit of its VM size small (2.0 GB) held" in said, said
    after = bob.call("GET", "/api/flows/hog/session").json()
    # the worker the limit killed fails the session (by design: protocol.py), saying so
    assert after["state"] in ("RUNNING", "FAILED"), (after, said)
    if after["state"] == "FAILED":
        assert "memory limit of its VM size small (2.0 GB) held" in after["reason"], after
    else:  # it goes on with a new worker; its events say which limit killed the old one
        events = bob.call("GET", f"/api/sessions/{after['id']}/events").json()
        assert any("memory limit of its VM size small" in str(e.get("reason"))
                   for e in events), events
    assert bob.call("POST", "/api/flows/hog/session/stop").status_code == 200

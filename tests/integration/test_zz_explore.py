import asyncio, shutil, json, time
from dataclasses import replace
from pathlib import Path
from flowsession.backends.compute.local import LocalBackend
from flowsession.computes.service import ComputeService
from flowsession.environments.service import EnvironmentService
from flowsession.sessions.service import SessionService
from flowsession.runs.service import RunService
from flowsession.runs.spec import RunSpec
from flowsession.store import open_store

FLOWS = Path("/work/main/tests/flows")

def test_x(settings, tmp_path):
    settings = replace(settings, standby_pool_size=0, idle_timeout_s=600)
    store = open_store(settings.db_url)
    backend = LocalBackend(settings)
    sessions = SessionService(settings, store, envs=EnvironmentService(settings, store),
                              computes=ComputeService(settings, store, backend), backend=backend)
    svc = RunService.open(settings, sessions=sessions)
    flow = shutil.copytree(FLOWS / "echo", tmp_path / "echo")
    t = time.time()
    r = asyncio.run(svc.create(RunSpec(flow=str(flow), data=str(flow / "data.jsonl")), user="ada"))
    print(r.status, time.time() - t)
    r = asyncio.run(svc.wait(r.name, user="ada", timeout=60))
    print(r, time.time() - t)
    print(svc.outputs(r.name, user="ada"))
    print(svc.details(r.name, user="ada"))
    for p in svc.files(r.name).root.rglob("*"):
        print(p)
    print((svc.files(r.name).root / "logs/run.log").read_text())
    for s in sessions.records.list(owner=None):
        asyncio.run(sessions._stop(s, actor="t", reason="x"))

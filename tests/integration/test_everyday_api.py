"""Everyday use (issue 10) through the SDK and the REST API of a real server: pf's habits,
many flows on one machine, prompt flow's container images and Dockerfiles, messages that say
what happened, and sessions with promptflow's telemetry off."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from helpers.flows import make_flow
from helpers.server import serving

from flowsession.client import Client
from flowsession.errors import InvalidInput

pytestmark = pytest.mark.timeout(600)

ADDER = "def run(a: int, b: int) -> dict:\n    return {'sum': a + b}\n"


def adder(root: Path, name: str, yaml_extra: str = "") -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "flow.flex.yaml").write_text("entry: adder:run\n" + yaml_extra)
    (folder / "adder.py").write_text(ADDER)
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory, images_dir, index):
    home = tmp_path_factory.mktemp("everyday-api") / "home"
    with serving(home, images_dir, index.url, env={"FLOWSESSION_VCPU_QUOTA": "2"}) as srv:
        yield srv


@pytest.fixture(scope="module")
def api(server):
    with Client(url=server.url, token=server.token) as c:
        yield c


def test_mappings_name_the_flows_inputs_and_skipped_lines_are_summarised(api, tmp_path):
    flow = adder(tmp_path, f"sum-{uuid.uuid4().hex[:6]}")
    data = tmp_path / "data.jsonl"
    data.write_text('{"x": 1, "y": 2}\nnot json\n{"x": 3, "y": 4}\n')
    with pytest.raises(InvalidInput) as exc:
        api.run(flow=flow, data=data, skip_malformed=True,
                column_mapping={"a": "${data.x}", "b": "${data.y}", "z": "${data.x}"})
    assert "'z'" in exc.value.message and "its inputs: a, b" in exc.value.message
    run = api.run(flow=flow, data=data, skip_malformed=True,
                  column_mapping={"a": "${data.x}", "b": "${data.y}"})
    assert run.summary() == ("2 of 2 line(s) completed; 1 malformed data line(s) skipped: "
                             "line 2")
    shown = api._http.request("GET", f"/api/runs/{run.name}")
    assert shown["summary"] == run.summary()


def test_flows_in_a_row_reclaim_the_least_recently_used_idle_session(api, tmp_path):
    flows = [adder(tmp_path, f"row{n}-{uuid.uuid4().hex[:6]}") for n in range(4)]
    for n, flow in enumerate(flows):
        assert api.test(flow, {"a": n, "b": 1}) == {"sum": n + 1}
    first = [e for e in api.session_events(flows[0]) if e["to_state"] == "STOPPED"]
    assert first and first[-1]["actor"] == "system:quota"
    assert first[-1]["reason"].startswith("reclaimed:")
    running = {s.flow for s in api.list_sessions()}
    assert len(running) == 2 and all(s.vm_size == "small" for s in api.list_sessions())
    sizes = api.compute_sizes()
    assert sizes["vcpu_quota"] == 2 and sizes["vcpu_quota_source"] == \
        "set by FLOWSESSION_VCPU_QUOTA"


def test_runtime_images_dockerfiles_and_install_messages(api, tmp_path, image_versions):
    ref = "mcr.microsoft.com/azureml/promptflow/promptflow-runtime:latest"
    flow = adder(tmp_path, f"pfimg-{uuid.uuid4().hex[:6]}", f"environment:\n  image: {ref}\n")
    assert api.test(flow, {"a": 1, "b": 1}) == {"sum": 2}
    assert any("is prompt flow's runtime image" in (e["reason"] or "")
               for e in api.session_events(flow))

    (tmp_path / "requirements.txt").write_text("tinyalpha==1.0\n")
    (tmp_path / "Dockerfile").write_text(
        f"FROM {ref}\nCOPY requirements.txt /app/\nRUN pip install -r /app/requirements.txt\n")
    name = f"team/df-{uuid.uuid4().hex[:6]}"
    seen: list[str] = []
    image = api.create_image(name, dockerfile=tmp_path / "Dockerfile",
                             on_progress=lambda e: seen.append(e.get("message") or ""))
    assert image["ref"] == f"{name}:1" and image["parent"] == "flowsession/runtime:1"
    assert any("+ tinyalpha==1.0" in line for line in seen)

    dag = make_flow(tmp_path, f"inst-{uuid.uuid4().hex[:6]}", "tinyalpha==1.0\n")
    assert api.test(dag, {"x": "hi"}) == {"y": "hi"}  # started implicitly: reclaims
    api.write_flow_file(dag, "requirements.txt", "tinyalpha==1.0\npromptflow\n")
    session = api.install(dag)
    assert f"promptflow {image_versions['promptflow']}" in session.reason
    assert "already provides" in session.reason
    listed = {c["name"]: c for c in api.list_computes()}
    for name_, compute in listed.items():
        shown = api.get_compute(name_)
        assert shown["sessions"] == compute["sessions"] and shown["name"] == shown["id"]
    assert api.get_session(dag).compute_id in listed


def test_promptflow_telemetry_is_off_in_sessions(api, tmp_path):
    folder = tmp_path / f"probe-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    (folder / "flow.flex.yaml").write_text("entry: probe:run\n")
    (folder / "probe.py").write_text(
        "def run() -> dict:\n"
        "    from promptflow._sdk._telemetry.telemetry import is_telemetry_enabled\n"
        "    return {'telemetry': is_telemetry_enabled()}\n")
    assert api.test(folder, {}) == {"telemetry": False}
    json.dumps(api.session_events(folder))  # the events are plain data

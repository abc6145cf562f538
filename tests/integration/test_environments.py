"""Environments built for real with uv over the real default image, from a local index."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from helpers.flows import make_flow, run

from flowsession.errors import (
    ContainerImageUnsupported,
    FlowFileError,
    ImageNotFound,
    PackageNotFound,
    RequirementsError,
    Unsatisfiable,
)


def _py(env, code: str) -> str:
    out = subprocess.run([str(env.python), "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _leftovers(settings) -> list[str]:
    return [p.name for p in settings.envs_dir.glob(".tmp-*")] if settings.envs_dir.exists() else []


def test_environment_adds_only_what_the_image_lacks(service, tmp_path, image_versions):
    flow = make_flow(tmp_path, "f", "tinydelta\n")
    env = run(service.ensure_for_flow(flow))
    # the flow's packages and the image's packages are both importable...
    assert _py(env, "import tinydelta, tinyalpha; print(tinyalpha.__version__)") == "2.0"
    assert _py(env, "import promptflow.core, promptflow.tools; print('ok')") == "ok"
    # ...but the environment holds only the two tiny packages, not a copy of the image
    site = next(Path(env.path).glob("lib/python*/site-packages"))
    assert not (site / "promptflow").exists()
    assert env.size_bytes < 5_000_000
    origins = {p.name: p.origin for p in service.packages(env)}
    assert origins["tinydelta"] == origins["tinyalpha"] == "requirements"
    assert origins["promptflow-core"] == "image"
    assert len([o for o in origins.values() if o == "image"]) == len(image_versions)


def test_a_flow_line_runs_with_promptflow_in_its_environment(service, tmp_path):
    flow = make_flow(tmp_path, "f", "tinyalpha==1.0\n")
    (flow / "echo.py").write_text(
        "import tinyalpha\nfrom promptflow.core import tool\n\n\n@tool\n"
        "def echo(x: str) -> str:\n    return f'{x} with tinyalpha {tinyalpha.__version__}'\n")
    prepared = run(service.prepare(flow))
    env = run(service.ensure(prepared))
    worker_root = Path(__file__).resolve().parents[2] / "src"
    out = subprocess.run(
        [str(env.python), "-m", "flowsession.worker.testline", "--inputs", "x=hi"],
        cwd=prepared.snapshot.path, env={**os.environ, "PYTHONPATH": str(worker_root)},
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert '"y": "hi with tinyalpha 1.0"' in out.stdout


def test_two_flows_with_the_same_requirements_share_one_environment(service, tmp_path):
    a = run(service.ensure_for_flow(make_flow(tmp_path, "a", "tinyalpha==1.0\n")))
    b = run(service.ensure_for_flow(make_flow(tmp_path, "b", "# same needs\ntinyalpha==1.0\n")))
    assert a.id == b.id
    assert [e.id for e in service.cache.list()] == [a.id]


def test_different_requirements_give_different_environments(service, tmp_path):
    a = run(service.ensure_for_flow(make_flow(tmp_path, "a", "tinyalpha==1.0\n")))
    b = run(service.ensure_for_flow(make_flow(tmp_path, "b", "tinyalpha==2.0\n")))
    assert a.id != b.id
    assert _py(b, "import tinyalpha; print(tinyalpha.__version__)") == "2.0"


def test_a_cache_hit_needs_no_package_index(service, settings, tmp_path, index):
    flow = make_flow(tmp_path, "f", "tinyalpha==1.0\n")
    first = run(service.ensure_for_flow(flow))
    from dataclasses import replace

    from flowsession.environments.service import EnvironmentService

    offline = EnvironmentService(replace(settings, index_url="http://127.0.0.1:9/simple"),
                                 service.store)
    os.environ["UV_HTTP_RETRIES"] = "0"
    try:
        # the index setting is part of the resolution key, so an unreachable index would fail
        # a fresh resolve; the same settings must hit the cache without any request
        before = len(index.requests)
        again = run(service.ensure_for_flow(flow))
        assert again.id == first.id and len(index.requests) == before
        with pytest.raises(Exception, match="could not be reached"):
            run(offline.ensure_for_flow(flow))
    finally:
        os.environ.pop("UV_HTTP_RETRIES")


def test_a_flow_without_requirements_gets_the_image_alone(service, tmp_path):
    env = run(service.ensure_for_flow(make_flow(tmp_path, "f", None)))
    assert env.lock == ""
    assert _py(env, "import promptflow.core; print('ok')") == "ok"


def test_unpinned_promptflow_is_satisfied_by_the_image(service, tmp_path):
    env = run(service.ensure_for_flow(make_flow(tmp_path, "f", "promptflow\npromptflow-tools\n")))
    assert env.lock == ""


def test_pinned_promptflow_tools_is_refused_naming_file_and_line(service, tmp_path):
    flow = make_flow(tmp_path, "f", "tinyalpha\npromptflow-tools==1.4.0\n")
    with pytest.raises(RequirementsError) as exc:
        run(service.ensure_for_flow(flow))
    msg = str(exc.value)
    assert "requirements.txt, line 2" in msg and "promptflow-tools" in msg
    assert "image provides" in msg and "1.6.1" in msg  # what the image has instead


def test_local_wheel_is_refused_with_a_pointer_to_custom_images(service, tmp_path):
    flow = make_flow(tmp_path, "f", "./dist/mytool-1.0-py3-none-any.whl\n")
    with pytest.raises(RequirementsError) as exc:
        run(service.ensure_for_flow(flow))
    assert "local file" in str(exc.value) and "flowsession image create" in exc.value.hint


def test_conflicting_requirements_name_the_packages_and_leave_nothing(service, settings,
                                                                      tmp_path):
    with pytest.raises(Unsatisfiable) as exc:
        run(service.ensure_for_flow(make_flow(tmp_path, "f", "tinybeta\ntinygamma\n")))
    msg = str(exc.value)
    assert "tinybeta" in msg and "tinygamma" in msg and "tinyalpha==1.0" in msg
    assert service.cache.list() == [] and _leftovers(settings) == []


def test_a_requirement_against_an_image_package_names_the_image_version(
        service, tmp_path, image_versions):
    with pytest.raises(Unsatisfiable) as exc:
        run(service.ensure_for_flow(make_flow(tmp_path, "f", "tinyclash\n")))
    msg = str(exc.value)
    assert "tinyclash" in msg and "packaging<20" in msg
    assert f"provides: packaging=={image_versions['packaging']}" in msg


def test_a_package_that_does_not_exist_is_named(service, tmp_path):
    with pytest.raises(PackageNotFound) as exc:
        run(service.ensure_for_flow(make_flow(tmp_path, "f", "tinyalpha\nno-such-tiny-pkg\n")))
    assert "no-such-tiny-pkg" in str(exc.value)


def test_the_package_index_being_down_is_reported(service, settings, tmp_path, monkeypatch):
    from helpers.index_server import down_index_url

    monkeypatch.setenv("UV_HTTP_RETRIES", "0")
    flow = make_flow(tmp_path, "f", f"-i {down_index_url()}\ntinyalpha\n")
    with pytest.raises(Exception) as exc:
        run(service.ensure_for_flow(flow))
    assert type(exc.value).__name__ == "IndexUnreachable"
    assert "could not be reached" in str(exc.value) and exc.value.hint
    assert _leftovers(settings) == []


def test_flow_file_errors_name_the_file_line_and_field(service, tmp_path):
    flow = make_flow(tmp_path, "f", "tinyalpha\n")
    (flow / "flow.dag.yaml").write_text("environment:\n  image: [unclosed\n")
    with pytest.raises(FlowFileError) as exc:
        run(service.ensure_for_flow(flow))
    assert "flow.dag.yaml" in str(exc.value) and exc.value.line is not None


def test_a_named_requirements_file_that_does_not_exist_is_an_error(service, tmp_path):
    flow = make_flow(tmp_path, "f", None)
    text = (flow / "flow.dag.yaml").read_text()
    (flow / "flow.dag.yaml").write_text(
        "environment:\n  python_requirements_txt: reqs/extra.txt\n" + text)
    with pytest.raises(FlowFileError) as exc:
        run(service.ensure_for_flow(flow))
    assert "environment.python_requirements_txt" in str(exc.value)
    assert "reqs/extra.txt" in str(exc.value)


def test_requirements_from_the_parent_folder_via_additional_includes(service, tmp_path):
    (tmp_path / "requirements.txt").write_text("tinyalpha==1.0\n")
    flow = make_flow(tmp_path, "f", None, extra_yaml="additional_includes:\n- ../requirements.txt\n")
    env = run(service.ensure_for_flow(flow))
    assert env.packages() == {"tinyalpha": "1.0"}


def test_container_image_reference_is_refused_listing_images(service, tmp_path):
    flow = make_flow(tmp_path, "f", None, image="docker.io/library/python:3.11")
    with pytest.raises(ContainerImageUnsupported) as exc:
        run(service.ensure_for_flow(flow))
    assert "container" in str(exc.value) and "flowsession image list" in exc.value.hint
    assert "--from-dockerfile" in exc.value.hint


def test_prompt_flows_runtime_image_is_served_by_the_default_image(service, tmp_path):
    flow = make_flow(tmp_path, "f", None,
                     image="mcr.microsoft.com/azureml/promptflow/promptflow-runtime:latest")
    prepared = run(service.prepare(flow))
    assert prepared.image.ref == "flowsession/runtime:1"
    assert "promptflow-runtime:latest is prompt flow's runtime image" in prepared.note


def test_unknown_image_is_an_error_listing_the_images_that_exist(service, tmp_path):
    with pytest.raises(ImageNotFound) as exc:
        run(service.ensure_for_flow(make_flow(tmp_path, "f", None, image="team/nope:3")))
    assert "team/nope:3" in str(exc.value) and "flowsession/runtime:1" in str(exc.value)


def test_custom_image_with_a_local_wheel_serves_flows_and_gets_new_versions(
        service, tmp_path, wheelhouse):
    from helpers.wheels import build_wheel

    wheel = build_wheel(tmp_path / "dist", "teamtool", "0.1")
    reqs = tmp_path / "image-reqs.txt"
    reqs.write_text(f"./dist/{wheel.name}\ntinyalpha==1.0\n")
    image = run(service.images.create("team/tools", base="flowsession/runtime", requirements=reqs))
    assert image.ref == "team/tools:1" and image.parent == "flowsession/runtime:1"
    flow = make_flow(tmp_path, "f", "tinydelta\n", image="team/tools:1")
    env = run(service.ensure_for_flow(flow))
    # the flow's resolver saw the image's tinyalpha==1.0 and kept it; its layer adds tinydelta
    assert env.packages() == {"tinydelta": "1.0"}
    assert _py(env, "import teamtool, tinyalpha, promptflow.core; print(tinyalpha.__version__)") \
        == "1.0"
    origins = {p.name: p.origin for p in service.packages(env)}
    assert origins["teamtool"] == origins["promptflow-core"] == "image"
    assert service.images.check("team/tools:1")["newer_available"] is False
    run(service.images.create("team/tools", base="flowsession/runtime", requirements=reqs))
    check = service.images.check("team/tools:1")
    assert check["newer_available"] and check["newest_version"] == 2


def test_private_feed_gets_the_identitys_secret_for_its_host(service, tmp_path, wheelhouse):
    from helpers.index_server import LocalIndex

    with LocalIndex(wheelhouse.directory, auth=("feeduser", "s3cr3t-t0ken")) as private:
        service.secrets.set(private.host, "feeduser:s3cr3t-t0ken")
        flow = make_flow(tmp_path, "f", f"-i http://{{private}}@{private.host}/simple\ntinysecret\n")
        env = run(service.ensure_for_flow(flow))
        assert env.packages() == {"tinysecret": "1.0"}
        assert any(authorized for _m, _p, authorized in private.requests)


def test_private_feed_without_a_secret_says_how_to_add_one(service, tmp_path):
    flow = make_flow(tmp_path, "f", "-i https://{private}@feed.example.com/simple\ntinysecret\n")
    with pytest.raises(RequirementsError) as exc:
        run(service.ensure_for_flow(flow))
    assert "feed.example.com" in str(exc.value)
    assert "flowsession feed set feed.example.com" in exc.value.hint


def test_a_wrong_secret_is_refused_without_being_echoed(service, tmp_path, wheelhouse):
    from helpers.index_server import LocalIndex

    with LocalIndex(wheelhouse.directory, auth=("feeduser", "right-one")) as private:
        service.secrets.set(private.host, "feeduser:wrong-0ne-xyz")
        flow = make_flow(tmp_path, "f", f"-i http://{{private}}@{private.host}/simple\ntinysecret\n")
        with pytest.raises(Exception) as exc:
            run(service.ensure_for_flow(flow))
    assert type(exc.value).__name__ == "IndexUnreachable"
    assert "credentials" in str(exc.value) and "wrong-0ne-xyz" not in str(exc.value.to_dict())


def test_concurrent_builds_of_one_environment_build_it_once(settings, tmp_path):
    import asyncio

    from flowsession.environments.service import EnvironmentService
    from flowsession.store import open_store

    flow = make_flow(tmp_path, "f", "tinyalpha==2.0\n")
    services = [EnvironmentService(settings, open_store(settings.db_url)) for _ in range(3)]

    async def all_at_once():
        return await asyncio.gather(*(s.ensure_for_flow(flow) for s in services))

    envs = run(all_at_once())
    assert len({e.id for e in envs}) == 1
    log = services[0].cache.log_path(envs[0].id).read_text()
    assert log.count("building environment") == 1


def test_a_custom_image_can_take_packages_from_a_private_feed(service, tmp_path, wheelhouse):
    from helpers.index_server import LocalIndex

    with LocalIndex(wheelhouse.directory, auth=("imguser", "img-t0ken-42")) as private:
        service.secrets.set(private.host, "imguser:img-t0ken-42")
        reqs = tmp_path / "image-reqs.txt"
        reqs.write_text(f"-i http://{{private}}@{private.host}/simple\ntinysecret==1.0\n")
        image = run(service.create_image("team/private", base="flowsession/runtime",
                                          requirements=reqs))
    assert image.state == "READY" and "tinysecret==1.0" in image.layer_lock
    assert "img-t0ken-42" not in repr(image.to_dict())
    logs = "".join(p.read_text() for p in (service.settings.logs_dir / "images").glob("*.log"))
    assert "img-t0ken-42" not in logs

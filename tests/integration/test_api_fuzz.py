"""Schemathesis against the OpenAPI schema: whatever it sends, the server never answers 5xx,
and every answer's status code, content type and body are the ones the schema documents
(the event streams included)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal

import pytest
import schemathesis
from fastapi.testclient import TestClient
from schemathesis import checks
from schemathesis.core.failures import FailureGroup
from hypothesis import given
from hypothesis import HealthCheck, settings as hsettings

from flowsession.api.app import bootstrap_admin, create_app
from flowsession.backends.compute import procs
from flowsession.config import Settings

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def app_and_token(tmp_path_factory, images_dir, index):
    home = tmp_path_factory.mktemp("fuzz") / "home"
    settings = Settings(home=home, images_path=images_dir, index_url=index.url)  # pool: default
    app = create_app(settings, background=False)
    token = bootstrap_admin(app.state.services, None)
    yield app, token
    for pid in procs.with_argument_under(str(settings.runtime_dir)):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(settings.runtime_dir, ignore_errors=True)


CHECKS = [checks.not_a_server_error, checks.status_code_conformance,
          checks.content_type_conformance, checks.response_schema_conformance]


def test_every_answer_is_one_the_schema_documents(app_and_token):
    app, token = app_and_token
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures: list[str] = []
    calls: list[int] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        # the event streams too: their subjects (a run, an operation) are unguessable names,
        # so these answer at once; a real stream is checked below

        @hsettings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "25")), deadline=None, database=None,
                   suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case):
            for headers in ({"Authorization": f"Bearer {token}"}, {}):
                response = case.call(headers=headers)
                calls.append(response.status_code)
                try:
                    case.validate_response(response, checks=CHECKS, headers=headers)
                except (AssertionError, FailureGroup) as exc:
                    failures.append(f"{case.method} {case.formatted_path} "
                                    f"{response.status_code} "
                                    f"{response.headers.get('content-type')}: "
                                    f"{str(exc)[:300]} {response.text[:200]}")

        check()
    assert failures == [], "\n".join(failures[:20])
    assert len(calls) > 500 and any(c < 300 for c in calls), "the fuzzing reached the API"


def test_an_event_stream_is_what_the_schema_says(app_and_token):
    """A real operation's event stream (an image build, already built: it ends at once)."""
    app, token = app_and_token
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    h = {"Authorization": f"Bearer {token}"}
    with TestClient(app) as client:
        op = client.post("/api/images/flowsession%2Fruntime:1/build", headers=h)
        assert op.status_code == 202, op.text
        path = f"/api/operations/{op.json()['id']}/events"
        response = client.get(path, headers=h)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.text.rstrip().endswith("event: end\ndata: {}")
    events = schema["/api/operations/{op_id}/events"]["GET"]
    case = events.Case(path_parameters={"op_id": op.json()["id"]})
    case.validate_response(response, checks=CHECKS)

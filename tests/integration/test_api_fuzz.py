"""Schemathesis against the OpenAPI schema: whatever it sends, the server never answers 5xx
(and its answers match the schema's status codes and content types)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal

import pytest
import schemathesis
from hypothesis import given
from hypothesis import HealthCheck, settings as hsettings

from flowsession.api.app import bootstrap_admin, create_app
from flowsession.backends.compute import procs
from flowsession.config import Settings

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def app_and_token(tmp_path_factory, images_dir, index):
    home = tmp_path_factory.mktemp("fuzz") / "home"
    settings = Settings(home=home, images_path=images_dir, index_url=index.url,
                        standby_pool_size=0)
    app = create_app(settings, background=False)
    token = bootstrap_admin(app.state.services, None)
    yield app, token
    for pid in procs.with_argument_under(str(settings.runtime_dir)):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(settings.runtime_dir, ignore_errors=True)


def test_no_request_gets_a_server_error(app_and_token):
    app, token = app_and_token
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures: list[str] = []
    calls: list[int] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path.endswith("/events"):
            continue  # server-sent events stream until their subject ends

        @hsettings(max_examples=25, deadline=None, database=None,
                   suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case):
            for headers in ({"Authorization": f"Bearer {token}"}, {}):
                response = case.call(headers=headers)
                calls.append(response.status_code)
                if response.status_code >= 500:
                    failures.append(f"{case.method} {case.formatted_path} "
                                    f"{response.status_code}: {response.text[:300]}")

        check()
    assert failures == [], "\n".join(failures[:20])
    assert len(calls) > 500 and any(c < 300 for c in calls), "the fuzzing reached the API"

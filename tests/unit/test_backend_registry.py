"""Compute backends are found by name; handles stored before backends kept their own fields
apart still read."""

from __future__ import annotations

import json
import sys

import pytest

from flowsession.backends.compute import registry
from flowsession.backends.compute.base import SessionHandle
from flowsession.backends.compute.local import LocalBackend
from flowsession.config import Settings
from flowsession.errors import InvalidInput


def test_the_settings_choose_the_backend_by_name(tmp_path):
    settings = Settings.from_env({"FLOWSESSION_HOME": str(tmp_path),
                                  "FLOWSESSION_BACKEND": "local"})
    assert isinstance(registry.create(settings), LocalBackend)
    assert {"local", "ray"} <= set(registry.names())


def test_ray_is_imported_only_when_chosen(tmp_path):
    ray_loaded = "ray" in sys.modules
    registry.create(Settings(home=tmp_path))
    assert ("ray" in sys.modules) == ray_loaded
    backend = registry.create(Settings(home=tmp_path), "ray")  # its module, not ray itself
    assert backend.name == "ray" and backend.builds_environments
    assert ("ray" in sys.modules) == ray_loaded


def test_a_third_backend_needs_only_its_module(tmp_path):
    backend = registry.create(Settings(home=tmp_path),
                              "flowsession.backends.compute.local:LocalBackend")
    assert backend.name == "local"


def test_an_unknown_backend_is_refused_naming_the_known_ones(tmp_path):
    with pytest.raises(InvalidInput) as exc:
        registry.create(Settings(home=tmp_path, backend="kubernetes"))
    assert "local" in exc.value.message and "ray" in exc.value.message


def test_the_ray_settings_come_from_the_environment(tmp_path):
    s = Settings.from_env({"FLOWSESSION_HOME": str(tmp_path), "FLOWSESSION_BACKEND": "ray",
                           "FLOWSESSION_RAY_ADDRESS": "10.0.0.5:6379",
                           "FLOWSESSION_RAY_NAMESPACE": "team-a",
                           "FLOWSESSION_NODE_HOME": str(tmp_path / "n")})
    assert (s.backend, s.ray_address, s.ray_namespace) == ("ray", "10.0.0.5:6379", "team-a")
    assert s.node_home == tmp_path / "n"
    assert Settings(home=tmp_path).node_home == tmp_path / "node"


def test_a_handle_stored_before_ref_existed_still_reads():
    old = {"backend": "local", "session_id": "ses-0123456789", "pid": 42, "pid_start": "77",
           "socket": "/tmp/x/s.sock", "slot": "/tmp/x/slots/s1", "sandboxed": True,
           "sandbox_detail": "bubblewrap", "limits_detail": "", "from_standby": False}
    handle = SessionHandle.from_json(old)
    assert handle.pid == 42 and handle.ref == {"pid": 42, "pid_start": "77",
                                               "socket": "/tmp/x/s.sock"}
    again = SessionHandle.from_json(json.loads(handle.json_text()))
    assert again == handle

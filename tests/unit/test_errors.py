"""The error tree: what a caller catches, and what an error says, whichever way it travelled
(raised here, or rebuilt from an API answer or a stored failure)."""

from __future__ import annotations

import pytest

from flowsession.errors import (
    BuildFailed,
    Conflict,
    FlowFileError,
    FlowNotFound,
    FlowSessionError,
    Forbidden,
    ImageNotFound,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
)


@pytest.mark.parametrize(("cls", "code"), [(FlowNotFound, "flow_not_found"),
                                           (ImageNotFound, "image_not_found")])
def test_a_missing_flow_or_image_is_caught_as_not_found_with_its_own_code(cls, code):
    err = cls("gone")
    assert isinstance(err, NotFound) and not isinstance(err, InvalidInput)
    assert (err.code, err.status) == (code, 404)
    rebuilt = FlowSessionError.from_dict(err.to_dict())
    assert type(rebuilt) is cls and isinstance(rebuilt, NotFound)


def test_a_too_large_request_is_invalid_input_with_status_413():
    err = PayloadTooLarge("too big", details={"limit": 10})
    assert isinstance(err, InvalidInput) and err.status == 413
    assert err.to_dict()["limit"] == 10


@pytest.mark.parametrize("name", ["message", "code", "hint", "status"])
def test_a_detail_can_never_shadow_code_message_hint_or_status(name):
    real = {"code": "conflict", "message": "the real message", "hint": "the real hint"}
    made = Conflict("the real message", hint="the real hint", details={name: "forged"})
    assert made.to_dict() == real
    assert (made.code, made.message, made.hint, made.status) == (*real.values(), 409)
    rebuilt = FlowSessionError.from_dict({**real, "status": "forged"})
    assert type(rebuilt) is Conflict and rebuilt.status == 409 and rebuilt.to_dict() == real


def test_rebuilt_errors_keep_their_details_in_details_and_readable_by_name():
    err = FlowSessionError.from_dict({"code": "forbidden", "message": "no", "hint": "",
                                      "scope": "computes:write"})
    assert type(err) is Forbidden
    assert err.details == {"scope": "computes:write"} and err.scope == "computes:write"
    assert "scope" not in vars(err)  # a detail is not an attribute of its own
    with pytest.raises(AttributeError):
        err.no_such_detail  # noqa: B018


def test_flow_file_and_build_errors_read_their_fields_from_details():
    err = FlowFileError("bad", file="flow.dag.yaml", line=3, field="nodes[0]")
    assert (err.file, err.line, err.field) == ("flow.dag.yaml", 3, "nodes[0]")
    rebuilt = FlowSessionError.from_dict(err.to_dict())
    assert type(rebuilt) is FlowFileError
    assert (rebuilt.file, rebuilt.line, rebuilt.field) == ("flow.dag.yaml", 3, "nodes[0]")
    build = FlowSessionError.from_dict(BuildFailed("no", log_tail="last lines").to_dict())
    assert type(build) is BuildFailed and build.log_tail == "last lines"
    assert build.log_path == ""


def test_no_error_the_product_raises_is_an_internal_server_error():
    """A user's request never meets a bare 500: every error class says what kind of failure it
    is (bad input 4xx, an unreachable dependency 502/503, a full disk 507)."""
    from flowsession.errors import _all_subclasses

    internal = [c.__name__ for c in _all_subclasses(FlowSessionError)
                if c.status == 500 and c.__subclasses__() == []]
    assert internal == []
    assert BuildFailed("no").status == 422

"""Build logs and build failures: what a user reads when a build goes wrong, and what must never be
in it (a feed's secret). Also the size settings that bound builds on disk. Pure logic; uv's error
texts below are verbatim from real uv runs."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import quote

import pytest

from flowsession.backends.uv import ImageLayers, classify_failure, fill_private
from flowsession.config import format_size, parse_size
from flowsession.environments.buildlog import REDACTED, BuildLog, tail
from flowsession.errors import (
    BuildFailed,
    EnvironmentError_,
    IndexUnreachable,
    InvalidInput,
    PackageNotFound,
    Unsatisfiable,
)


@pytest.fixture
def log(tmp_path):
    with BuildLog(tmp_path / "logs" / "env-1.log") as build_log:
        yield build_log


def everything_a_user_can_read(log: BuildLog) -> str:
    return log.path.read_text(encoding="utf-8") + "\n" + log.tail(1000)


# --- secrets never reach the log -----------------------------------------------------------------


def test_a_user_and_token_secret_never_appears_in_the_log_in_any_form(tmp_path):
    secret = "user:tok3n"
    with BuildLog(tmp_path / "build.log", secrets=[secret]) as log:
        log.step("uv pip compile requirements.in")
        log.write(f"GET https://{secret}@feed.example.com/simple/requests/\n")
        log.write(f"retrying with {quote(secret, safe='')}\n")
        log.write("password was tok3n\n")

        seen = everything_a_user_can_read(log)

    assert "tok3n" not in seen
    assert "user%3Atok3n" not in seen
    assert REDACTED in seen
    assert "feed.example.com/simple/requests/" in seen  # the rest of the line is kept


def test_a_token_secret_added_during_the_build_never_appears_in_the_log(log):
    log.write("starting\n")
    log.add_secret("s3cr3t/t0ken+x")
    log.write("GET https://s3cr3t/t0ken+x@feed.example.com/simple\n")
    log.write("GET https://s3cr3t%2Ft0ken%2Bx@feed.example.com/simple\n")

    seen = everything_a_user_can_read(log)

    assert "s3cr3t" not in seen
    assert "t0ken" not in seen
    assert log.path.read_text(encoding="utf-8").count(REDACTED) == 2


def test_the_filled_feed_url_is_redacted_from_the_log(log):
    secret = "me@corp.com:tok3n"
    log.add_secret(secret)
    url = fill_private("https://{private}@feed.example.com/simple", {"feed.example.com": secret})

    log.write(f"error: Failed to fetch: {url}/zzz/\n")

    seen = everything_a_user_can_read(log)
    assert "tok3n" not in seen
    assert "me%40corp.com" not in seen


def test_a_password_holding_a_colon_is_redacted_from_the_filled_feed_url(log):
    secret = "user:pa:ss"
    log.add_secret(secret)
    url = fill_private("https://{private}@feed.example.com/simple", {"feed.example.com": secret})

    log.write(f"error: Failed to fetch: {url}/zzz/\n")

    assert "pa%3Ass" not in everything_a_user_can_read(log)


def test_a_url_encoded_password_alone_is_redacted(log):
    log.add_secret("user:p/ss")

    log.write("password p%2Fss rejected\n")

    assert "p%2Fss" not in everything_a_user_can_read(log)


def test_tail_returns_the_last_lines_of_the_log(log):
    for i in range(1, 41):
        log.write(f"line {i}\n")

    assert log.tail(3) == "line 38\nline 39\nline 40"
    assert log.tail().splitlines() == [f"line {i}" for i in range(16, 41)]  # 25 by default
    assert tail(log.path, 1) == "line 40"


def test_tail_of_a_log_that_does_not_exist_is_empty(tmp_path):
    assert tail(tmp_path / "never-written.log") == ""


def test_steps_are_timestamped_lines(log):
    log.step("create the venv")

    assert re.fullmatch(r"\[\d\d:\d\d:\d\d\] create the venv", log.tail(1))


# --- uv's failures, classified -------------------------------------------------------------------

IMAGE = ImageLayers(ref="flowsession/runtime:1", python="/usr/bin/python3",
                    python_version="3.12.3", platform="linux-x86_64", site_dirs=(),
                    pins="pydantic==2.14.3\n")

NOT_FOUND = (
    "error: No solution found when resolving dependencies\n"
    "  cause: Because nosuchpkg was not found in the package registry and you require nosuchpkg, "
    "we can conclude that your requirements are unsatisfiable."
)
CONFLICT = (
    "error: No solution found when resolving dependencies\n"
    "  cause: Because you require pydantic<2 and pydantic==2.14.3, we can conclude that your "
    "requirements are unsatisfiable."
)
UNAUTHORIZED = (
    "error: No solution found when resolving dependencies\n"
    "  cause: Because c was not found in the package registry and you require c, we can conclude "
    "that your requirements are unsatisfiable.\n"
    "\n"
    "hint: An index URL (http://127.0.0.1:34777/simple) could not be queried due to a lack of "
    "valid authentication credentials (401 Unauthorized)"
)
REFUSED = (
    "error: Failed to fetch: http://127.0.0.1:47037/simple/zzz/\n"
    "  cause: error sending request for url (http://127.0.0.1:47037/simple/zzz/)\n"
    "  cause: client error (Connect)\n"
    "  cause: tcp connect error\n"
    "  cause: Connection refused (os error 111)"
)


def classify(stderr: str, log: BuildLog, image: ImageLayers | None = IMAGE):
    log.write(stderr + "\n")
    return classify_failure(stderr, what="resolve requirements.txt", image=image, log=log)


def test_a_package_missing_from_the_index_is_named(log):
    err = classify(NOT_FOUND, log)

    assert type(err) is PackageNotFound
    assert err.message.startswith("resolve requirements.txt: package nosuchpkg was not found")
    assert err.details["packages"] == ["nosuchpkg"]
    assert "feed (-i)" in err.hint
    assert "nosuchpkg" in err.log_tail


def test_a_conflict_with_the_image_says_what_the_image_provides(log):
    err = classify(CONFLICT, log)

    assert type(err) is Unsatisfiable
    assert "cannot be satisfied" in err.message
    assert "pydantic<2" in err.message
    assert "image flowsession/runtime:1 provides: pydantic==2.14.3" in err.message
    assert "relax the conflicting versions" in err.hint


def test_a_conflict_without_an_image_still_explains_the_conflict(log):
    err = classify(CONFLICT, log, image=None)

    assert type(err) is Unsatisfiable
    assert "pydantic<2" in err.message
    assert "provides" not in err.message


def test_a_feed_refusing_the_credentials_is_an_unreachable_index_not_a_missing_package(log):
    err = classify(UNAUTHORIZED, log)

    assert type(err) is IndexUnreachable
    assert not isinstance(err, PackageNotFound)
    assert "refused the credentials" in err.message
    assert "flowsession feed set" in err.hint


def test_an_index_refusing_connections_is_unreachable(log):
    err = classify(REFUSED, log)

    assert type(err) is IndexUnreachable
    assert "could not be reached" in err.message
    assert "Connection refused" in err.message
    assert "index is up" in err.hint


def test_a_coloured_uv_error_is_classified_the_same(log):
    err = classify("\x1b[31merror\x1b[0m: " + NOT_FOUND.removeprefix("error: "), log)

    assert type(err) is PackageNotFound
    assert "\x1b[" not in err.message


def test_any_other_failure_points_at_the_build_log(log):
    err = classify("error: Failed to build `weird==1.0`\n  Caused by: disk on fire", log)

    assert type(err) is BuildFailed
    assert str(log.path) in err.hint
    assert err.log_path == str(log.path)
    assert "disk on fire" in err.message
    assert "disk on fire" in err.log_tail
    assert err.to_dict()["code"] == "environment_build_failed"


@pytest.mark.parametrize("stderr", [NOT_FOUND, CONFLICT, UNAUTHORIZED, REFUSED, "boom"])
def test_every_build_failure_carries_the_log_path_and_tail(log, stderr):
    err = classify(stderr, log)

    assert isinstance(err, EnvironmentError_)
    assert err.log_path == str(log.path)
    assert err.log_tail == log.tail()
    assert Path(err.to_dict()["log_path"]) == log.path


# --- sizes (config.py) ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("20GB", 20 * 10**9),
        ("1.5GiB", 3 * 2**29),
        ("512M", 512 * 10**6),
        ("1048576", 1048576),
        ("20 gb", 20 * 10**9),
        ("4KiB", 4096),
        ("2T", 2 * 10**12),
    ],
)
def test_sizes_are_read_in_decimal_and_binary_units(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["twenty", "20XB", "", "-5GB", "1,5GB"])
def test_an_unreadable_size_names_the_setting(text):
    with pytest.raises(InvalidInput) as info:
        parse_size(text, name="FLOWSESSION_ENV_DISK_BUDGET")

    assert info.value.message.startswith("FLOWSESSION_ENV_DISK_BUDGET: cannot read")
    assert "20GB" in info.value.hint


@pytest.mark.parametrize("text", ["10iB", "5i"])
def test_a_unit_without_a_magnitude_names_the_setting(text):
    with pytest.raises(InvalidInput) as info:
        parse_size(text, name="FLOWSESSION_ENV_DISK_BUDGET")

    assert "FLOWSESSION_ENV_DISK_BUDGET" in info.value.message


def test_sizes_are_shown_in_decimal_units():
    assert format_size(512) == "512 B"
    assert format_size(20 * 10**9) == "20.0 GB"
    assert format_size(1.5 * 10**12) == "1.5 TB"

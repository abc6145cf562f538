"""Reading a flow's requirements file, and filling a feed's secret in: what a user sees when their
requirements.txt is right or wrong. Pure logic on files under tmp_path; no network, no uv."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from flowsession.backends.uv import ImageLayers, fill_private, parse_pins
from flowsession.environments.requirements import Feed, parse_requirements
from flowsession.errors import RequirementsError


def write(folder: Path, text: str, name: str = "requirements.txt") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def refusal(path: Path, **kwargs) -> RequirementsError:
    with pytest.raises(RequirementsError) as info:
        parse_requirements(path, **kwargs)
    return info.value


# --- the promptflow family comes from the image ------------------------------------------------


def test_pinned_promptflow_tools_is_refused_naming_file_line_and_package(tmp_path):
    path = write(tmp_path, "requests>=2.31\npromptflow-tools==1.4.0\n")

    err = refusal(path)

    assert err.message.startswith("requirements.txt, line 2:")
    assert "promptflow-tools==1.4.0" in err.message
    assert "which the image provides" in err.message
    assert "remove the version from requirements.txt" in err.hint
    assert err.code == "requirements_invalid"


def test_pinned_promptflow_tools_refusal_says_which_version_the_image_has(tmp_path):
    path = write(tmp_path, "promptflow-tools==1.4.0\n")

    err = refusal(path, image_versions={"promptflow-tools": "1.6.0", "promptflow": "1.17.1"})

    assert "line 1" in err.message
    assert "it has promptflow-tools 1.6.0" in err.message
    assert "flowsession image list" in err.hint


def test_any_version_bound_on_an_image_package_is_refused_whatever_its_spelling(tmp_path):
    path = write(tmp_path, "Promptflow_Tools>=1\n")

    err = refusal(path)

    assert "requirements.txt, line 1" in err.message
    assert "pins promptflow-tools" in err.message


def test_unpinned_promptflow_is_dropped_and_reported_as_satisfied_by_the_image(tmp_path):
    path = write(tmp_path, "promptflow\nrequests>=2.31\npromptflow-tools\npromptflow[azure]\n")

    reqs = parse_requirements(path)

    assert reqs.requirements == ("requests>=2.31",)
    assert set(reqs.satisfied_by_image) == {"promptflow", "promptflow-tools"}
    assert "promptflow" not in reqs.requirements_text


# --- local files belong in a custom image --------------------------------------------------------

@pytest.mark.parametrize(
    "line",
    [
        "./pkg-1.0-py3-none-any.whl",
        "/abs/x.whl",
        "pkg @ file:///x.whl",
        "pkg @ file:///src/pkg",
        "-e .",
    ],
)
def test_local_packages_are_refused_with_a_hint_to_build_a_custom_image(tmp_path, line):
    path = write(tmp_path, f"requests\n{line}\n")

    err = refusal(path)

    assert err.message.startswith("requirements.txt, line 2:")
    assert line in err.message
    assert "custom image" in err.hint
    assert "flowsession image create" in err.hint


def test_with_local_files_allowed_a_relative_wheel_is_found_next_to_the_requirements_file(
    tmp_path, monkeypatch
):
    flow = tmp_path / "flow"
    path = write(flow, "./wheels/pkg-1.0-py3-none-any.whl\n/abs/x.whl\n")
    monkeypatch.chdir(tmp_path)  # somewhere else: the path must not depend on the cwd

    reqs = parse_requirements(path, allow_local=True)

    wheel = (flow / "wheels" / "pkg-1.0-py3-none-any.whl").resolve()
    assert reqs.requirements == (str(wheel), "/abs/x.whl")
    assert Path(reqs.requirements[0]).is_absolute()


# --- feeds ---------------------------------------------------------------------------------------


def test_private_index_url_is_a_primary_feed_that_needs_a_secret_for_its_host(tmp_path):
    path = write(tmp_path, "-i https://{private}@feed.example.com/simple\nrequests\n")

    reqs = parse_requirements(path)

    assert reqs.requirements == ("requests",)
    (feed,) = reqs.feeds
    assert feed.host == "feed.example.com"
    assert feed.needs_secret is True
    assert feed.primary is True
    # the secret is filled at install time, never while reading the file
    assert feed.url == "https://{private}@feed.example.com/simple"


def test_extra_index_url_is_read_in_both_the_equals_and_the_spaced_form(tmp_path):
    path = write(
        tmp_path,
        "--extra-index-url=https://one.example.com/simple?a=b\n"
        "--extra-index-url https://two.example.com/simple?a=b\n"
        "--index-url https://main.example.com/simple/\n",
    )

    reqs = parse_requirements(path)

    assert reqs.feeds == (
        Feed(url="https://one.example.com/simple?a=b", primary=False),
        Feed(url="https://two.example.com/simple?a=b", primary=False),
        Feed(url="https://main.example.com/simple", primary=True),
    )
    assert not any(f.needs_secret for f in reqs.feeds)


def test_an_index_option_without_a_url_says_the_url_is_missing(tmp_path):
    path = write(tmp_path, "--index-url\n")

    err = refusal(path)

    assert "line 1" in err.message
    assert "unknown option" not in err.message
    assert "URL" in err.message or "url" in err.message


# --- -r and -c -----------------------------------------------------------------------------------


def test_included_requirements_file_is_read_in_place(tmp_path):
    write(tmp_path, "flask\nclick>=8\n", name="other.txt")
    path = write(tmp_path, "requests\n-r other.txt\nhttpx\n")

    reqs = parse_requirements(path)

    assert reqs.requirements == ("requests", "flask", "click>=8", "httpx")
    assert reqs.constraints == ()


def test_an_error_inside_an_included_file_names_that_file_and_its_line(tmp_path):
    write(tmp_path, "flask\npromptflow==1.0.0\n", name="other.txt")
    path = write(tmp_path, "requests\n-r other.txt\n")

    err = refusal(path)

    assert err.message.startswith("other.txt (included from requirements.txt), line 2:")
    assert "promptflow" in err.message


def test_an_included_file_that_does_not_exist_is_named(tmp_path):
    path = write(tmp_path, "-r missing.txt\n")

    err = refusal(path)

    assert "missing.txt" in err.message
    assert "does not exist" in err.message


def test_includes_that_loop_are_refused(tmp_path):
    write(tmp_path, "-r b.txt\n", name="a.txt")
    write(tmp_path, "-r a.txt\n", name="b.txt")

    err = refusal(tmp_path / "a.txt")

    assert "nest too deeply" in err.message


def test_constraints_file_adds_constraints_not_requirements(tmp_path):
    write(tmp_path, "urllib3<2\n# why: old proxy\n", name="cons.txt")
    path = write(tmp_path, "-c cons.txt\nrequests\n")

    reqs = parse_requirements(path)

    assert reqs.requirements == ("requests",)
    assert reqs.constraints == ("urllib3<2",)
    assert reqs.constraints_text == "urllib3<2\n"


def test_constraints_files_that_loop_are_refused(tmp_path):
    write(tmp_path, "-c b.txt\n", name="a.txt")
    write(tmp_path, "-c a.txt\n", name="b.txt")

    with pytest.raises(RequirementsError):
        parse_requirements(tmp_path / "a.txt")


def test_pinned_promptflow_in_a_constraints_file_says_which_version_the_image_has(tmp_path):
    write(tmp_path, "promptflow==1.0.0\n", name="cons.txt")
    path = write(tmp_path, "-c cons.txt\n")

    err = refusal(path, image_versions={"promptflow": "1.17.1"})

    assert "cons.txt" in err.message
    assert "it has promptflow 1.17.1" in err.message


# --- lines ---------------------------------------------------------------------------------------


def test_comments_and_blank_lines_are_ignored_and_inline_comments_stripped(tmp_path):
    path = write(
        tmp_path,
        "# the flow's packages\n\n   \nrequests>=2.31  # HTTP\n\t# indented comment\nflask\n",
    )

    reqs = parse_requirements(path)

    assert reqs.requirements == ("requests>=2.31", "flask")


def test_backslash_continuation_joins_lines_into_one_requirement(tmp_path):
    path = write(tmp_path, "requests \\\n    >=2.31\nflask\n")

    reqs = parse_requirements(path)

    assert reqs.requirements == ("requests>=2.31", "flask")


def test_an_error_after_a_continued_line_still_names_the_right_line(tmp_path):
    path = write(tmp_path, "requests \\\n    >=2.31\nflask\nnot a requirement!\n")

    err = refusal(path)

    assert err.message.startswith("requirements.txt, line 4:")


def test_a_comment_ending_in_a_backslash_does_not_swallow_the_next_requirement(tmp_path):
    path = write(tmp_path, "# C:\\wheels\\\nrequests\n")

    reqs = parse_requirements(path)

    assert reqs.requirements == ("requests",)


def test_an_invalid_requirement_names_its_line(tmp_path):
    path = write(tmp_path, "requests\n\nnot a valid===req!\n")

    err = refusal(path)

    assert err.message.startswith("requirements.txt, line 3:")
    assert "not a valid===req!" in err.message
    assert "is not a valid requirement" in err.message
    assert "requests>=2.31" in err.hint


def test_messages_use_the_display_name_given_for_the_file(tmp_path):
    path = write(tmp_path / "flows" / "chat", "promptflow-tools==1.4.0\n")

    err = refusal(path, display="flows/chat/requirements.txt")

    assert err.message.startswith("flows/chat/requirements.txt, line 1:")


def test_a_missing_requirements_file_says_it_does_not_exist(tmp_path):
    err = refusal(tmp_path / "requirements.txt")

    assert err.message == "requirements file requirements.txt does not exist"
    assert "python_requirements_txt" in err.hint


def test_an_unknown_option_is_refused_naming_it_and_its_line(tmp_path):
    path = write(tmp_path, "requests\n--no-such-option value\n")

    err = refusal(path)

    assert err.message.startswith("requirements.txt, line 2:")
    assert "unknown option '--no-such-option'" in err.message
    assert "--extra-index-url" in err.hint


@pytest.mark.parametrize("line", ["--find-links ./wheels", "-f ./wheels",
                                  "--find-links=https://example.com/wheels/"])
def test_find_links_is_refused(tmp_path, line):
    path = write(tmp_path, f"requests\n{line}\n")

    err = refusal(path)

    assert err.message.startswith("requirements.txt, line 2:")
    assert "--find-links is not supported" in err.message
    assert "custom image" in err.hint


def test_harmless_pip_options_are_accepted(tmp_path):
    path = write(tmp_path, "--trusted-host feed.example.com\n--pre\n--no-binary :all:\nrequests\n")

    assert parse_requirements(path).requirements == ("requests",)


# --- digest: when an environment must be rebuilt -------------------------------------------------


def test_digest_is_the_same_for_the_same_content(tmp_path):
    text = "-i https://{private}@feed.example.com/simple\nrequests>=2.31\n-c cons.txt\n"
    write(tmp_path / "a", "urllib3<2\n", name="cons.txt")
    write(tmp_path / "b", "urllib3<2\n", name="cons.txt")
    one = parse_requirements(write(tmp_path / "a", text))
    two = parse_requirements(write(tmp_path / "b", text))

    assert one.digest() == two.digest()


def test_digest_ignores_comments_and_blank_lines(tmp_path):
    one = parse_requirements(write(tmp_path / "a", "requests>=2.31\nflask\n"))
    two = parse_requirements(write(tmp_path / "b", "# deps\nrequests>=2.31  # http\n\nflask\n"))

    assert one.digest() == two.digest()


@pytest.mark.parametrize(
    "changed",
    [
        "requests>=2.32\nflask\n",  # a version
        "requests>=2.31\nflask\nclick\n",  # a package added
        "-i https://other.example.com/simple\nrequests>=2.31\nflask\n",  # a feed
    ],
)
def test_digest_changes_when_a_line_changes(tmp_path, changed):
    before = parse_requirements(write(tmp_path / "a", "requests>=2.31\nflask\n"))
    after = parse_requirements(write(tmp_path / "b", changed))

    assert before.digest() != after.digest()


# --- filling {private} at install time (backends/uv.py) ------------------------------------------


def test_private_feed_is_filled_with_the_percent_encoded_user_and_token_for_its_host():
    url = fill_private("https://{private}@feed.example.com/simple",
                       {"feed.example.com": "me@corp.com:t/k n:1"})

    assert url == "https://me%40corp.com:t%2Fk%20n%3A1@feed.example.com/simple"


def test_private_feed_with_a_token_only_secret_puts_the_token_as_the_user():
    url = fill_private("https://{private}@feed.example.com/simple", {"feed.example.com": "tok3n"})

    assert url == "https://tok3n@feed.example.com/simple"


def test_private_feed_host_is_matched_whatever_its_case():
    url = fill_private("https://{private}@Feed.Example.COM/simple",
                       {"feed.example.com": "user:tok3n"})

    assert url == "https://user:tok3n@Feed.Example.COM/simple"


def test_private_feed_on_a_port_uses_the_secret_stored_for_host_and_port(tmp_path):
    path = write(tmp_path, "-i https://{private}@feed.example.com:8443/simple\n")
    (feed,) = parse_requirements(path).feeds

    url = fill_private(feed.url, {feed.host: "user:tok3n"})

    assert feed.host == "feed.example.com:8443"
    assert url == "https://user:tok3n@feed.example.com:8443/simple"


def test_private_feed_without_a_secret_says_which_host_and_how_to_add_one():
    with pytest.raises(RequirementsError) as info:
        fill_private("https://{private}@feed.example.com/simple", {"other.example.com": "x:y"})

    err = info.value
    assert "feed.example.com" in err.message
    assert "flowsession feed set feed.example.com" in err.hint


def test_a_feed_without_private_is_left_alone():
    url = "https://feed.example.com/simple?a=b"

    assert fill_private(url, {}) == url


# --- reading pins (backends/uv.py) ---------------------------------------------------------------


def test_pins_are_read_with_canonical_names_and_markers_dropped():
    text = (
        'Name_X==1.0 ; python_version>="3"\n'
        "zope.interface==6.1\n"
        "requests[socks]==2.31.0\n"
        "pydantic==2.14.3 \\\n"
        "    --hash=sha256:abc\n"
        "# a comment\n"
        "\n"
        "flask>=3\n"
    )

    assert parse_pins(text) == {
        "name-x": "1.0",
        "zope-interface": "6.1",
        "requests": "2.31.0",
        "pydantic": "2.14.3",
    }


def test_image_versions_come_from_its_pins():
    image = ImageLayers(ref="flowsession/runtime:1", python="/usr/bin/python3",
                        python_version="3.12.3", platform="linux-x86_64", site_dirs=(),
                        pins="Promptflow_Tools==1.6.0\npydantic==2.14.3\n")

    assert image.versions() == {"promptflow-tools": "1.6.0", "pydantic": "2.14.3"}
    assert re.fullmatch(r"[0-9a-f]{64}", image.digest)

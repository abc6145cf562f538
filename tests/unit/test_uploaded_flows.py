"""An uploaded flow draws only on its own folder: includes, symlinks and requirements files
that lead out are refused, naming the include and never the server's paths. A folder of the
server's machine keeps prompt flow's behaviour."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from flowsession.config import Settings
from flowsession.environments.requirements import parse_requirements
from flowsession.errors import FlowFileError, InvalidInput, NotFound, RequirementsError
from flowsession.flows import load_flow, make_snapshot
from flowsession.flows.paths import check_path_text, file_in
from flowsession.flows.registry import FlowRegistry, upload_root
from flowsession.store import open_store
from helpers.flows import HELLO_DAG as DAG

HELLO = "def hello(name):\n    return name\n"


def dag(*includes: str) -> str:
    listed = "".join(f"- {inc}\n" for inc in includes)
    return DAG + (f"additional_includes:\n{listed}" if includes else "")


def make_upload(root: Path, yaml_text: str, files: dict[str, str] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "flow.dag.yaml").write_text(textwrap.dedent(yaml_text))
    for rel, text in {"hello.py": HELLO, **(files or {})}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


@pytest.fixture
def server(tmp_path: Path) -> Path:
    """A server's home with the files an upload must never reach."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "secret.key").write_text("TOP-SECRET-KEY\n")
    (home / "client.json").write_text('{"token": "fs_secret"}\n')
    return home


@pytest.fixture
def store(tmp_path: Path):
    store = tmp_path / "store"
    yield store
    for root, _dirs, _files in os.walk(store):
        os.chmod(root, 0o755)


def assert_no_server_path(err: Exception, *paths: Path) -> None:
    said = repr(getattr(err, "to_dict", lambda: {})()) + str(err)
    for path in paths:
        assert str(path) not in said, said
    assert "TOP-SECRET" not in said and "fs_secret" not in said


@pytest.mark.parametrize("include", ["../../secret.key", "../../client.json", "/etc/passwd",
                                     "../../../", "sub/../../../secret.key"])
def test_an_include_leading_out_of_an_upload_is_refused_naming_the_include(server, include):
    upload = make_upload(server / "flows" / "bob" / "f", dag("hello.py", include))
    with pytest.raises(FlowFileError) as err:
        load_flow(upload, root=upload)
    assert err.value.field == "additional_includes[1]"
    assert f"'{include}'" in err.value.message and "outside the uploaded flow" in err.value.message
    assert err.value.file == "flow.dag.yaml" and err.value.line == DAG.count("\n") + 3
    assert_no_server_path(err.value, server)


def test_an_include_that_is_a_symlink_out_of_an_upload_is_refused(server, store):
    upload = make_upload(server / "flows" / "bob" / "f", dag("common"))
    (upload / "common").symlink_to(server, target_is_directory=True)
    with pytest.raises(FlowFileError) as err:
        make_snapshot(load_flow(upload, root=upload), store)
    assert err.value.field == "additional_includes[0]" and "'common'" in err.value.message
    assert_no_server_path(err.value, server)


def test_a_symlink_out_of_an_upload_is_refused_without_saying_where_it_leads(server, store):
    upload = make_upload(server / "flows" / "bob" / "f", dag())
    (upload / "data").mkdir()
    (upload / "data" / "key.txt").symlink_to(server / "secret.key")
    with pytest.raises(FlowFileError) as err:
        make_snapshot(load_flow(upload, root=upload), store)
    assert err.value.file == "data/key.txt"
    assert "symlink that leads outside the uploaded flow" in err.value.message
    assert_no_server_path(err.value, server)
    assert not store.exists() or not any(store.iterdir())  # nothing was copied


def test_a_requirements_file_leading_out_of_an_upload_is_refused(server):
    upload = make_upload(server / "flows" / "bob" / "f",
                         "environment:\n  python_requirements_txt: requirements.txt\n" + DAG)
    (upload / "requirements.txt").symlink_to(server / "secret.key")
    with pytest.raises(FlowFileError) as err:
        load_flow(upload, root=upload)
    assert err.value.field == "environment.python_requirements_txt"
    assert_no_server_path(err.value, server)


def test_an_upload_with_its_includes_inside_is_snapshotted_as_prompt_flow_does(server, store):
    upload = make_upload(server / "flows" / "bob" / "f", dag("_includes/common",
                                                             "_includes/requirements.txt"),
                         {"_includes/common/util.py": "X = 1\n",
                          "_includes/requirements.txt": "tinyalpha\n"})
    flow = load_flow(upload, root=upload)
    assert flow.requirements_path == (upload / "_includes" / "requirements.txt").resolve()
    snap = make_snapshot(flow, store)
    assert (snap.path / "common" / "util.py").read_text() == "X = 1\n"
    assert (snap.path / "requirements.txt").read_text() == "tinyalpha\n"
    assert snap.flow.root == snap.path  # the copy is confined to itself


def test_an_uploads_errors_name_its_files_by_their_path_in_the_flow(server):
    upload = make_upload(server / "flows" / "bob" / "f", "nodes: [unclosed\n")
    with pytest.raises(FlowFileError) as err:
        load_flow(upload, root=upload)
    assert err.value.file == "flow.dag.yaml" and "flow.dag.yaml, line" in err.value.message
    assert_no_server_path(err.value, server)
    missing = make_upload(server / "flows" / "bob" / "g",
                          "environment:\n  python_requirements_txt: nope.txt\n" + DAG)
    with pytest.raises(FlowFileError) as err:
        load_flow(missing, root=missing)
    assert "does not exist in the flow folder" in err.value.message
    assert_no_server_path(err.value, server)


def test_a_folder_of_the_servers_machine_keeps_prompt_flows_includes(tmp_path, store):
    (tmp_path / "requirements.txt").write_text("tinyalpha\n")
    folder = make_upload(tmp_path / "mine", dag("../requirements.txt"))
    snap = make_snapshot(load_flow(folder), store)
    assert (snap.path / "requirements.txt").read_text() == "tinyalpha\n"
    assert snap.flow.root is None


def test_requirements_of_an_upload_cannot_include_files_outside_it(server):
    snap = server / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "requirements.txt").write_text("-r ../../secret.key\n")
    with pytest.raises(RequirementsError) as err:
        parse_requirements(snap / "requirements.txt", root=snap)
    assert "leads outside the uploaded flow" in err.value.message
    assert_no_server_path(err.value, server)
    (snap / "more.txt").write_text("tinyalpha\n")
    (snap / "requirements.txt").write_text("-r more.txt\n")
    assert parse_requirements(snap / "requirements.txt", root=snap).requirements == ("tinyalpha",)


def test_which_flows_are_uploads_is_judged_by_where_they_are(tmp_path):
    settings = Settings(home=tmp_path / "home")
    flows = settings.flows_dir
    (flows / "bob" / "f" / "sub").mkdir(parents=True)
    assert upload_root(settings, flows / "bob" / "f") == flows / "bob" / "f"
    assert upload_root(settings, flows / "bob" / "f" / "sub") == flows / "bob" / "f"
    assert upload_root(settings, tmp_path / "elsewhere") is None
    (tmp_path / "alias").symlink_to(flows / "bob" / "f", target_is_directory=True)
    assert upload_root(settings, tmp_path / "alias") == (flows / "bob" / "f").resolve()


# --- the registry ------------------------------------------------------------------------------


@pytest.fixture
def registry(server) -> FlowRegistry:
    settings = Settings(home=server)
    return FlowRegistry(settings, open_store(settings.db_url))


@pytest.mark.parametrize("include", ["../../../secret.key", "../../../client.json",
                                     "../../../flowsession.db", "/etc/passwd"])
def test_registering_an_upload_whose_include_leads_out_leaves_nothing(registry, server,
                                                                      include):
    with pytest.raises(FlowFileError) as err:
        registry.register("f", owner="bob", files={"flow.dag.yaml": dag(include),
                                                   "hello.py": HELLO})
    assert err.value.field == "additional_includes[0]" and include in err.value.message
    assert_no_server_path(err.value, server)
    assert registry.list(owner=None) == [] and not any((server / "flows" / "bob").iterdir())


@pytest.mark.parametrize("rel", ["a\x00b.py", "../x.py", "/etc/x", ".hidden", "a/\x07.py",
                                 "x" * 300, ""])
def test_an_uploaded_file_name_that_is_no_plain_path_is_refused(registry, rel):
    with pytest.raises(InvalidInput) as err:
        registry.register("f", owner="bob", files={"flow.dag.yaml": dag(), rel: "x"})
    assert err.value.status == 422 and err.value.details["field"] == "files"


def test_an_uploaded_flow_file_that_became_a_symlink_is_not_read_or_written(registry, server):
    flow = registry.register("f", owner="bob", files={"flow.dag.yaml": dag(),
                                                      "hello.py": HELLO})
    folder = Path(flow.path)
    (folder / "key.txt").symlink_to(server / "secret.key")
    (folder / "sub").symlink_to(server, target_is_directory=True)
    for rel in ("key.txt", "sub/secret.key"):
        with pytest.raises(InvalidInput) as err:
            registry.read(flow, rel)
        assert_no_server_path(err.value, server)
        with pytest.raises(InvalidInput):
            registry.write(flow, rel, "overwritten")
    assert (server / "secret.key").read_text() == "TOP-SECRET-KEY\n"


def test_saving_an_uploaded_flow_file_with_an_include_out_is_refused(registry, server):
    flow = registry.register("f", owner="bob", files={"flow.dag.yaml": dag(),
                                                      "hello.py": HELLO})
    with pytest.raises(FlowFileError) as err:
        registry.write(flow, "flow.dag.yaml", dag("../../../secret.key"))
    assert err.value.field == "additional_includes[0]"
    assert registry.read(flow, "flow.dag.yaml") == dag()
    registry.write(flow, "flow.dag.yaml", "nodes: [unfinished\n")  # a Save in progress: kept
    assert registry.read(flow, "flow.dag.yaml") == "nodes: [unfinished\n"


def test_reading_or_writing_a_folder_as_a_file_is_a_clean_refusal(registry):
    flow = registry.register("f", owner="bob", files={"flow.dag.yaml": dag(),
                                                      "hello.py": HELLO, "sub/a.txt": "a"})
    with pytest.raises(InvalidInput):
        registry.read(flow, "sub")
    with pytest.raises(InvalidInput):
        registry.write(flow, "sub", "x")
    with pytest.raises(InvalidInput):
        registry.write(flow, "hello.py/x.txt", "x")
    with pytest.raises(NotFound):
        registry.read(flow, "hello.py/x.txt")


@pytest.mark.parametrize("text", ["a\x00b", "a\nb", "x" * 2000, "a/" + "y" * 256])
def test_path_text_no_file_system_takes_is_refused_naming_the_field(text):
    with pytest.raises(InvalidInput) as err:
        check_path_text(text, field="data")
    assert err.value.details["field"] == "data" and err.value.message.startswith("data: ")


def test_a_file_of_a_folder_of_the_servers_machine_may_be_a_symlink(tmp_path):
    (tmp_path / "real.txt").write_text("shared\n")
    folder = make_upload(tmp_path / "mine", dag())
    (folder / "link.txt").symlink_to(tmp_path / "real.txt")
    assert file_in(folder, "link.txt", confined=False).read_text() == "shared\n"
    with pytest.raises(InvalidInput):
        file_in(folder, "link.txt", confined=True)


# --- what the CLI and the SDK upload ----------------------------------------------------------


def test_a_local_flows_includes_are_bundled_so_the_upload_snapshots_like_the_folder(
        tmp_path, registry, store):
    from flowsession.client.upload import collect_files

    (tmp_path / "requirements.txt").write_text("tinyalpha==1.0\n")
    (tmp_path / "shared_code" / "pkg").mkdir(parents=True)
    (tmp_path / "shared_code" / "pkg" / "util.py").write_text("X = 1\n")
    (tmp_path / "shared_code" / "__pycache__").mkdir()
    (tmp_path / "shared_code" / "__pycache__" / "x.pyc").write_bytes(b"\0\1")
    yaml_text = ("environment:\n  python_requirements_txt: requirements.txt\n" + DAG +
                 "additional_includes:  # from the folder above\n- ../requirements.txt\n"
                 "- '../shared_code/'\n- extra/local.txt\n")
    local = make_upload(tmp_path / "flow", yaml_text, {"extra/local.txt": "here\n"})
    files = collect_files(local)
    assert files["_includes/requirements.txt"] == "tinyalpha==1.0\n"
    assert files["_includes/shared_code/pkg/util.py"] == "X = 1\n"
    assert not any("__pycache__" in rel for rel in files)
    assert "# from the folder above" in files["flow.dag.yaml"]
    assert load_flow(local).additional_includes == ("../requirements.txt", "../shared_code/",
                                                     "extra/local.txt")
    uploaded = registry.register("flow", owner="bob", files=files)
    flow = load_flow(uploaded.path, root=uploaded.path)
    assert flow.additional_includes == ("_includes/requirements.txt", "_includes/shared_code",
                                        "extra/local.txt")
    from_upload = make_snapshot(flow, store / "a")
    from_folder = make_snapshot(load_flow(local), store / "b")
    listed = {p.relative_to(from_folder.path).as_posix()
              for p in from_folder.path.rglob("*") if p.is_file()}
    for rel in listed - {"flow.dag.yaml"}:
        assert (from_upload.path / rel).read_bytes() == (from_folder.path / rel).read_bytes()
    assert from_upload.flow.requirements_path.read_text() == "tinyalpha==1.0\n"


def test_a_local_include_that_is_missing_is_named_before_anything_is_sent(tmp_path):
    from flowsession.client.upload import collect_files

    local = make_upload(tmp_path / "flow", dag("../nope.txt"))
    with pytest.raises(FlowFileError) as err:
        collect_files(local)
    assert err.value.field == "additional_includes[0]" and "'../nope.txt'" in err.value.message


def test_an_include_that_is_a_symlink_out_of_the_local_folder_is_bundled_too(tmp_path,
                                                                             registry):
    from flowsession.client.upload import collect_files

    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "util.py").write_text("X = 2\n")
    local = make_upload(tmp_path / "flow", dag("common"))
    (local / "common").symlink_to(tmp_path / "common", target_is_directory=True)
    files = collect_files(local)
    assert files["_includes/common/util.py"] == "X = 2\n"
    assert '- "_includes/common"' in files["flow.dag.yaml"]
    assert not any(rel.startswith("common/") for rel in files)
    registry.register("linked", owner="bob", files=files)

"""Reading flow folders and snapshotting them: what a user sees when a flow is right or wrong."""

from __future__ import annotations

import os
import stat
import textwrap
import threading
from pathlib import Path

import pytest

from flowsession.errors import FlowFileError, FlowNotFound
from flowsession.flows import load_flow, make_snapshot, snapshot_id_of
from flowsession.flows import snapshot as snapshot_module
from helpers.flows import HELLO_DAG as DAG

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "flows"



def make_flow(
    folder: Path,
    yaml_text: str = DAG,
    files: dict[str, str] | None = None,
    name: str = "flow.dag.yaml",
) -> Path:
    """Write a flow folder with ``yaml_text`` as its flow file and ``files`` beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(textwrap.dedent(yaml_text))
    for rel, content in {
        "hello.py": "def hello(name):\n    return name\n",
        **(files or {}),
    }.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(content)
    return folder


def snapshot_files(path: Path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}


@pytest.fixture
def store(tmp_path: Path):
    store = tmp_path / "store"
    yield store
    for root, _dirs, _files in os.walk(store):  # let pytest clean up the read-only snapshots
        os.chmod(root, 0o755)


# --- finding the flow --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind", "requirements"),
    [
        ("hello", "dag", "hello/requirements.txt"),
        ("shared-reqs", "dag", "shared_requirements/requirements.txt"),
        ("flex-echo", "flex", None),
    ],
)
def test_example_flows_load_and_snapshot(name, kind, requirements, store):
    flow = load_flow(EXAMPLES / name)
    assert flow.kind == kind
    expected = EXAMPLES / requirements if requirements else None
    assert flow.requirements_path == (expected.resolve() if expected else None)
    snap = make_snapshot(flow, store)
    if requirements:
        assert snap.flow.requirements_path == snap.path / "requirements.txt"
        assert snap.flow.requirements_path.read_text() == expected.read_text()
    assert flow.file.name in snapshot_files(snap.path)


def test_flow_can_be_given_by_its_yaml_file(tmp_path):
    folder = make_flow(tmp_path / "f")
    flow = load_flow(folder / "flow.dag.yaml")
    assert flow.folder == folder.resolve() and flow.kind == "dag"
    assert [n["name"] for n in flow.nodes] == ["hello"]


def test_missing_folder_is_flow_not_found_naming_the_path(tmp_path):
    with pytest.raises(FlowNotFound) as err:
        load_flow(tmp_path / "nope")
    assert str(tmp_path / "nope") in err.value.message


def test_folder_without_flow_file_names_the_expected_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FlowFileError) as err:
        load_flow(tmp_path / "empty")
    assert err.value.file.endswith("flow.dag.yaml")
    assert "create flow.dag.yaml" in err.value.hint


def test_yml_spelling_is_accepted(tmp_path):
    folder = make_flow(tmp_path / "f", "entry: echo:echo\n", name="flow.flex.yml")
    assert load_flow(folder).kind == "flex"


def test_folder_with_both_dag_and_flex_files_is_refused(tmp_path):
    folder = make_flow(tmp_path / "f")
    (folder / "flow.flex.yaml").write_text("entry: echo:echo\n")
    with pytest.raises(FlowFileError, match="more than one flow file"):
        load_flow(folder)


# --- YAML and field errors ---------------------------------------------------------------------


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    folder = make_flow(
        tmp_path / "f", "inputs:\n  name:\n    type: string\n  bad: [unclosed\nnodes: []\n"
    )
    with pytest.raises(FlowFileError) as err:
        load_flow(folder)
    assert err.value.file == str(folder / "flow.dag.yaml")
    assert err.value.line in (4, 5)
    assert f"flow.dag.yaml, line {err.value.line}" in str(err.value)
    assert "cannot be parsed" in str(err.value) and "Traceback" not in str(err.value)


def test_flow_file_that_is_a_list_is_refused(tmp_path):
    folder = make_flow(tmp_path / "f", "- a\n- b\n")
    with pytest.raises(FlowFileError, match="a list, not a mapping"):
        load_flow(folder)


def test_empty_flow_file_is_refused(tmp_path):
    folder = make_flow(tmp_path / "f", "")
    with pytest.raises(FlowFileError, match="empty"):
        load_flow(folder)


def test_image_and_requirements_come_from_environment(tmp_path):
    folder = make_flow(tmp_path / "f", "environment:\n  image: flowsession/runtime:2\n" + DAG)
    flow = load_flow(folder)
    assert flow.image == "flowsession/runtime:2"
    assert flow.requirements_file == "requirements.txt" and flow.requirements_path is None


def test_empty_image_names_field_and_line(tmp_path):
    folder = make_flow(
        tmp_path / "f", DAG + "environment:\n  python_requirements_txt: r.txt\n  image: ''\n"
    )
    with pytest.raises(FlowFileError) as err:
        load_flow(folder)
    assert err.value.field == "environment.image"
    assert err.value.line == DAG.count("\n") + 3
    assert err.value.to_dict()["line"] == err.value.line


def test_environment_that_is_not_a_mapping_is_refused(tmp_path):
    folder = make_flow(tmp_path / "f", "environment: python3\n" + DAG)
    with pytest.raises(FlowFileError) as err:
        load_flow(folder)
    assert (err.value.field, err.value.line) == ("environment", 1)


def test_bad_include_entry_names_its_index_and_line(tmp_path):
    folder = make_flow(tmp_path / "f", DAG + "additional_includes:\n- ../a.txt\n- 42\n")
    with pytest.raises(FlowFileError) as err:
        load_flow(folder)
    assert err.value.field == "additional_includes[1]"
    assert err.value.line == DAG.count("\n") + 3


def test_node_without_name_names_the_node_and_line(tmp_path):
    yaml_text = "nodes:\n- name: a\n  type: python\n- type: python\n  source: {path: x.py}\n"
    with pytest.raises(FlowFileError) as err:
        load_flow(make_flow(tmp_path / "f", yaml_text))
    assert (err.value.field, err.value.line) == ("nodes[1].name", 4)
    assert "needs a 'name'" in str(err.value)


def test_duplicate_node_name_is_refused_naming_it(tmp_path):
    yaml_text = "nodes:\n- name: a\n  type: python\n- name: a\n  type: llm\n"
    with pytest.raises(FlowFileError) as err:
        load_flow(make_flow(tmp_path / "f", yaml_text))
    assert (err.value.field, err.value.line) == ("nodes[1].name", 4)
    assert "'a' is already used by nodes[0]" in str(err.value)


def test_node_needs_a_type_unless_it_uses_variants(tmp_path):
    with pytest.raises(FlowFileError) as err:
        load_flow(make_flow(tmp_path / "f", "nodes:\n- name: a\n"))
    assert err.value.field == "nodes[0].type"
    flow = load_flow(make_flow(tmp_path / "g", "nodes:\n- name: a\n  use_variants: true\n"))
    assert flow.nodes[0]["name"] == "a"


def test_inputs_must_be_a_mapping(tmp_path):
    with pytest.raises(FlowFileError) as err:
        load_flow(make_flow(tmp_path / "f", "nodes: []\ninputs:\n- name\n"))
    assert (err.value.field, err.value.line) == ("inputs", 2)


def test_flex_flow_needs_entry(tmp_path):
    folder = make_flow(
        tmp_path / "f", "inputs:\n  text:\n    type: string\n", name="flow.flex.yaml"
    )
    with pytest.raises(FlowFileError) as err:
        load_flow(folder)
    assert err.value.field == "entry"
    assert "entry: <module>:<function>" in err.value.hint


def test_flex_entry_must_be_module_and_function(tmp_path):
    folder = make_flow(tmp_path / "f", "$schema: x\nentry: echo.py\n", name="flow.flex.yaml")
    with pytest.raises(FlowFileError) as err:
        load_flow(folder)
    assert (err.value.field, err.value.line) == ("entry", 2)
    ok = make_flow(tmp_path / "g", "entry: my_pkg.flow:ChatFlow\n", name="flow.flex.yaml")
    assert load_flow(ok).entry == "my_pkg.flow:ChatFlow"


# --- the requirements file ---------------------------------------------------------------------


def test_renamed_requirements_file_is_used(tmp_path):
    folder = make_flow(
        tmp_path / "f",
        "environment:\n  python_requirements_txt: deps/reqs.txt\n" + DAG,
        {"deps/reqs.txt": "tabulate\n", "requirements.txt": "six\n"},
    )
    flow = load_flow(folder)
    assert flow.requirements_path == folder.resolve() / "deps" / "reqs.txt"


def test_missing_named_requirements_file_is_an_error(tmp_path):
    folder = make_flow(tmp_path / "f", DAG + "environment:\n  python_requirements_txt: reqs.txt\n")
    with pytest.raises(FlowFileError) as err:
        load_flow(folder)
    assert err.value.field == "environment.python_requirements_txt"
    assert err.value.line == DAG.count("\n") + 2
    assert "reqs.txt" in str(err.value)


def test_requirements_named_outside_the_folder_point_to_additional_includes(tmp_path):
    (tmp_path / "requirements.txt").write_text("tabulate\n")
    folder = make_flow(
        tmp_path / "f", "environment:\n  python_requirements_txt: ../requirements.txt\n" + DAG
    )
    with pytest.raises(FlowFileError) as err:
        load_flow(folder)
    assert "additional_includes" in err.value.hint


def test_requirements_from_an_included_folder_are_found(tmp_path):
    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "reqs.txt").write_text("tabulate\n")
    yaml_text = (
        "environment:\n  python_requirements_txt: common/reqs.txt\n"
        "additional_includes:\n- ../common/\n" + DAG
    )
    flow = load_flow(make_flow(tmp_path / "f", yaml_text))
    assert flow.requirements_path == (tmp_path / "common" / "reqs.txt").resolve()


# --- snapshots ---------------------------------------------------------------------------------


def test_snapshot_copies_the_flow_but_not_caches_or_tool_state(tmp_path, store):
    folder = make_flow(
        tmp_path / "f",
        files={
            "lib/util.py": "X = 1\n",
            "__pycache__/hello.cpython-311.pyc": "",
            "lib/old.pyc": "",
            ".git/HEAD": "ref",
            ".promptflow/flow.tools.json": "{}",
            ".venv/pyvenv.cfg": "",
            ".runs/run1/out.jsonl": "",
        },
    )
    (folder / "empty").mkdir()
    snap = make_snapshot(load_flow(folder), store)
    assert snapshot_files(snap.path) == {"flow.dag.yaml", "hello.py", "lib/util.py"}
    assert snap.source == folder.resolve() and snap.flow.folder == snap.path


def test_additional_include_from_parent_folder_lands_in_snapshot(tmp_path, store):
    (tmp_path / "requirements.txt").write_text("tabulate\n")
    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "prompts.py").write_text("P = 'hi'\n")
    yaml_text = (
        "environment:\n  python_requirements_txt: requirements.txt\n"
        "additional_includes:\n- ../requirements.txt\n- ../common/\n" + DAG
    )
    snap = make_snapshot(load_flow(make_flow(tmp_path / "f", yaml_text)), store)
    assert snapshot_files(snap.path) == {
        "flow.dag.yaml",
        "hello.py",
        "requirements.txt",
        "common/prompts.py",
    }
    assert snap.flow.requirements_path == snap.path / "requirements.txt"


def test_same_flow_gives_same_snapshot_id(tmp_path, store):
    flow = load_flow(make_flow(tmp_path / "f"))
    first, second = make_snapshot(flow, store), make_snapshot(flow, store)
    assert first.id == second.id == snapshot_id_of(flow)
    assert len(first.digest) == 64 and first.digest.startswith(first.id)
    copy = make_flow(tmp_path / "elsewhere")  # same content in another folder: same snapshot
    assert make_snapshot(load_flow(copy), store).path == first.path
    assert [p.name for p in store.iterdir()] == [first.id]


def test_changed_file_gives_new_snapshot_and_keeps_the_old_one(tmp_path, store):
    folder = make_flow(tmp_path / "f")
    old = make_snapshot(load_flow(folder), store)
    (folder / "hello.py").write_text("def hello(name):\n    return name.upper()\n")
    new = make_snapshot(load_flow(folder), store)
    assert new.id != old.id
    assert "upper" not in (old.path / "hello.py").read_text()
    assert "upper" in (new.path / "hello.py").read_text()


def test_making_a_file_executable_gives_new_snapshot(tmp_path, store):
    folder = make_flow(tmp_path / "f", files={"run.sh": "echo hi\n"})
    before = snapshot_id_of(load_flow(folder))
    os.chmod(folder / "run.sh", 0o755)
    snap = make_snapshot(load_flow(folder), store)
    assert snap.id != before
    assert os.stat(snap.path / "run.sh").st_mode & 0o111


def test_snapshot_is_read_only(tmp_path, store):
    snap = make_snapshot(load_flow(make_flow(tmp_path / "f", files={"lib/x.py": ""})), store)
    for path in [snap.path, snap.path / "lib", snap.path / "hello.py", snap.path / "lib" / "x.py"]:
        assert stat.S_IMODE(os.stat(path).st_mode) & 0o222 == 0, path


def test_snapshot_id_of_copies_nothing(tmp_path, store):
    flow = load_flow(make_flow(tmp_path / "f"))
    snapshot_id = snapshot_id_of(flow)
    assert not store.exists()
    assert make_snapshot(flow, store).id == snapshot_id


def test_missing_include_names_field_and_line(tmp_path, store):
    yaml_text = DAG + "additional_includes:\n- ../here.txt\n- ../missing.txt\n"
    (tmp_path / "here.txt").write_text("x")
    flow = load_flow(make_flow(tmp_path / "f", yaml_text))
    with pytest.raises(FlowFileError) as err:
        make_snapshot(flow, store)
    assert err.value.field == "additional_includes[1]"
    assert err.value.line == DAG.count("\n") + 3
    assert "../missing.txt" in str(err.value)


def test_include_collision_is_refused(tmp_path, store):
    (tmp_path / "hello.py").write_text("other\n")
    flow = load_flow(make_flow(tmp_path / "f", DAG + "additional_includes:\n- ../hello.py\n"))
    with pytest.raises(FlowFileError) as err:
        make_snapshot(flow, store)
    assert err.value.field == "additional_includes[0]"
    assert "'hello.py'" in str(err.value) and "flow folder" in str(err.value)
    assert not store.exists() or not any(store.iterdir())


def test_two_includes_with_the_same_name_are_refused(tmp_path, store):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "requirements.txt").write_text(sub)
    yaml_text = DAG + "additional_includes:\n- ../a/requirements.txt\n- ../b/requirements.txt\n"
    with pytest.raises(FlowFileError) as err:
        make_snapshot(load_flow(make_flow(tmp_path / "f", yaml_text)), store)
    assert err.value.field == "additional_includes[1]"
    assert "additional_includes[0] ('../a/requirements.txt')" in str(err.value)


def test_symlink_inside_the_flow_is_copied_as_content(tmp_path, store):
    folder = make_flow(tmp_path / "f", files={"real.txt": "data\n"})
    (folder / "link.txt").symlink_to("real.txt")
    snap = make_snapshot(load_flow(folder), store)
    assert not (snap.path / "link.txt").is_symlink()
    assert (snap.path / "link.txt").read_text() == "data\n"


def test_symlink_outside_the_flow_folder_is_refused(tmp_path, store):
    (tmp_path / "secret.txt").write_text("s")
    folder = make_flow(tmp_path / "f")
    (folder / "link.txt").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(FlowFileError) as err:
        make_snapshot(load_flow(folder), store)
    assert err.value.file == str(folder / "link.txt")
    assert "outside the flow folder" in str(err.value) and "additional_includes" in err.value.hint


def test_symlink_into_an_additional_include_is_allowed(tmp_path, store):
    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "shared.py").write_text("S = 1\n")
    folder = make_flow(tmp_path / "f", DAG + "additional_includes:\n- ../common\n")
    (folder / "shared_link.py").symlink_to(tmp_path / "common" / "shared.py")
    snap = make_snapshot(load_flow(folder), store)
    assert (snap.path / "shared_link.py").read_text() == "S = 1\n"


def test_symlink_loop_is_refused(tmp_path, store):
    folder = make_flow(tmp_path / "f")
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    with pytest.raises(FlowFileError, match="loops"):
        make_snapshot(load_flow(folder), store)


def test_store_inside_the_flow_folder_is_not_copied_into_snapshots(tmp_path):
    folder = make_flow(tmp_path / "f")
    inner = folder / "snapshots"
    first = make_snapshot(load_flow(folder), inner)
    second = make_snapshot(load_flow(folder), inner)
    assert first.id == second.id
    assert snapshot_files(second.path) == {"flow.dag.yaml", "hello.py"}
    for root, _dirs, _files in os.walk(inner):
        os.chmod(root, 0o755)


def test_snapshot_of_a_custom_named_flow_file_keeps_its_name(tmp_path, store):
    folder = make_flow(tmp_path / "f", name="chat.dag.yaml")
    snap = make_snapshot(load_flow(folder / "chat.dag.yaml"), store)
    assert snap.flow.file == snap.path / "chat.dag.yaml" and snap.flow.kind == "dag"


def test_concurrent_makers_of_the_same_snapshot_all_succeed(tmp_path, store):
    flow = load_flow(
        make_flow(tmp_path / "f", files={f"m{i}.py": "x = 1\n" * 1000 for i in range(20)})
    )
    results, errors = [], []

    def make():
        try:
            results.append(make_snapshot(flow, store).id)
        except Exception as exc:  # noqa: BLE001 - the test reports it
            errors.append(exc)

    threads = [threading.Thread(target=make) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(set(results)) == 1
    assert [p.name for p in store.iterdir()] == results[:1]  # no temp folders left behind


def test_losing_the_rename_race_still_returns_the_snapshot(tmp_path, store, monkeypatch):
    flow = load_flow(make_flow(tmp_path / "f"))
    winner = make_snapshot(flow, store)
    monkeypatch.setattr(snapshot_module, "_already_made", lambda path: False)  # both raced past
    loser = make_snapshot(flow, store)
    assert loser.id == winner.id and (loser.path / "hello.py").is_file()
    assert [p.name for p in store.iterdir()] == [winner.id]


def test_a_flow_dag_yaml_with_an_entry_is_a_flex_flow_as_in_prompt_flow(tmp_path):
    """Early flex flows were written as flow.dag.yaml with an `entry:`; pf runs them as flex
    flows, and their inputs come from the entry's signature."""
    from flowsession.runs.flexinputs import flow_inputs

    folder = make_flow(tmp_path / "f", "entry: echo:echo\n", name="flow.dag.yaml")
    (folder / "echo.py").write_text("def echo(text: str, times: int = 2) -> str:\n"
                                    "    return text * times\n")
    flow = load_flow(folder)
    assert (flow.kind, flow.entry) == ("flex", "echo:echo")
    assert [(i.name, i.default) for i in flow_inputs(flow)][1] == ("times", 2)
    assert flow_inputs(flow)[0].name == "text"

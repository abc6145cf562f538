"""Batch run inputs: loading data files and applying a column mapping (prompt flow semantics)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flowsession.errors import InvalidInput
from flowsession.runs.data import DataSet, load_data
from flowsession.runs.mapping import (
    BaseRun,
    FlowInputSpec,
    describe_mapping,
    parse_mapping_args,
    resolve_inputs,
)


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_text(text, encoding=encoding)
    return path


def jsonl(path: Path, rows: list) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


def dataset(rows: list[dict], name: str = "data.jsonl") -> DataSet:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    return DataSet(path=Path(name), rows=rows, columns=columns, skipped=[])


def base_run(outputs: dict[int, dict], inputs: dict[int, dict] | None = None,
             name: str = "base_run") -> BaseRun:
    inputs = inputs if inputs is not None else {i: {"q": f"q{i}"} for i in range(4)}
    out_cols = sorted({k for o in outputs.values() for k in o})
    in_cols = sorted({k for o in inputs.values() for k in o})
    return BaseRun(name=name, inputs=inputs, outputs=outputs, output_columns=out_cols,
                   input_columns=in_cols)


def inputs(*names: str, **with_defaults) -> list[FlowInputSpec]:
    return [FlowInputSpec(n) for n in names] + [
        FlowInputSpec(n, default=d) for n, d in with_defaults.items()]


# --- load_data: formats ----------------------------------------------------------------------


def test_jsonl_rows_in_file_order_with_column_union(tmp_path):
    path = jsonl(tmp_path / "data.jsonl", [{"q": "a", "n": 1}, {"q": "b", "extra": [1, 2]},
                                           {"n": 3}])
    ds = load_data(path)
    assert ds.rows == [{"q": "a", "n": 1}, {"q": "b", "extra": [1, 2]}, {"n": 3}]
    assert ds.columns == ["q", "n", "extra"]
    assert ds.skipped == []
    assert ds.path == path


def test_jsonl_accepts_str_path_and_keeps_json_types(tmp_path):
    path = jsonl(tmp_path / "data.jsonl", [{"i": 1, "f": 1.5, "b": True, "z": None,
                                            "o": {"k": "v"}}])
    ds = load_data(str(path))
    assert ds.rows == [{"i": 1, "f": 1.5, "b": True, "z": None, "o": {"k": "v"}}]


def test_jsonl_blank_and_whitespace_lines_are_ignored(tmp_path):
    path = write(tmp_path / "data.jsonl", '\n{"q": 1}\n   \n\t\n{"q": 2}\r\n\n')
    assert load_data(path).rows == [{"q": 1}, {"q": 2}]


def test_jsonl_with_bom_and_crlf(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes('\ufeff{"q": "é"}\r\n{"q": "ü"}\r\n'.encode())
    ds = load_data(path)
    assert ds.rows == [{"q": "é"}, {"q": "ü"}]
    assert ds.columns == ["q"]


def test_jsonl_line_separator_inside_string_is_not_a_line_break(tmp_path):
    path = write(tmp_path / "data.jsonl", '{"q": "a\u2028b"}\n{"q": "c"}\n')
    assert load_data(path).rows == [{"q": "a\u2028b"}, {"q": "c"}]


def test_json_list_of_objects(tmp_path):
    path = write(tmp_path / "data.json", json.dumps([{"q": 1}, {"q": 2, "a": "x"}], indent=2))
    ds = load_data(path)
    assert ds.rows == [{"q": 1}, {"q": 2, "a": "x"}]
    assert ds.columns == ["q", "a"]


def test_json_single_object_is_one_row(tmp_path):
    path = write(tmp_path / "data.json", '{"q": "only"}')
    assert load_data(path).rows == [{"q": "only"}]


def test_json_invalid_names_file_and_line(tmp_path):
    path = write(tmp_path / "data.json", '[\n  {"q": 1},\n  {"q": 2,}\n]')
    with pytest.raises(InvalidInput) as err:
        load_data(path)
    assert "data.json line 3 is not valid JSON" in err.value.message
    assert err.value.details["line"] == 3


def test_json_item_that_is_not_an_object(tmp_path):
    path = write(tmp_path / "data.json", '[{"q": 1}, "oops"]')
    with pytest.raises(InvalidInput) as err:
        load_data(path)
    assert "item 2" in err.value.message and "not a JSON object" in err.value.message
    assert "a string" in err.value.message


def test_json_scalar_is_rejected(tmp_path):
    path = write(tmp_path / "data.json", "42")
    with pytest.raises(InvalidInput) as err:
        load_data(path)
    assert "list of objects" in err.value.message


def test_csv_header_and_string_values(tmp_path):
    path = write(tmp_path / "data.csv", 'q,n\nhello,1\n"with, comma",2\n')
    ds = load_data(path)
    assert ds.rows == [{"q": "hello", "n": "1"}, {"q": "with, comma", "n": "2"}]
    assert ds.columns == ["q", "n"]


def test_csv_quoted_newline_and_blank_lines(tmp_path):
    path = write(tmp_path / "data.csv", 'q,n\n"two\nlines",1\n\nlast,2\n')
    assert load_data(path).rows == [{"q": "two\nlines", "n": "1"}, {"q": "last", "n": "2"}]


def test_csv_with_bom(tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes("\ufeffq,n\nx,1\n".encode())
    ds = load_data(path)
    assert ds.columns == ["q", "n"]  # not "\ufeffq"
    assert ds.rows == [{"q": "x", "n": "1"}]


def test_tsv(tmp_path):
    path = write(tmp_path / "data.tsv", "q\tn\nwith, comma\t1\n")
    assert load_data(path).rows == [{"q": "with, comma", "n": "1"}]


def test_csv_row_with_wrong_number_of_values(tmp_path):
    path = write(tmp_path / "data.csv", "q,n\na,1\nb,2,3\nc,3\n")
    with pytest.raises(InvalidInput) as err:
        load_data(path)
    assert "data.csv line 3" in err.value.message
    assert "3 values" in err.value.message and "2 columns" in err.value.message
    assert err.value.details["line"] == 3
    ds = load_data(path, skip_malformed=True)
    assert ds.rows == [{"q": "a", "n": "1"}, {"q": "c", "n": "3"}]
    assert [line for line, _ in ds.skipped] == [3]


def test_csv_duplicate_header(tmp_path):
    path = write(tmp_path / "data.csv", "q,q\n1,2\n")
    with pytest.raises(InvalidInput) as err:
        load_data(path)
    assert "'q' twice" in err.value.message


def test_csv_header_only_has_no_lines(tmp_path):
    path = write(tmp_path / "data.csv", "q,n\n")
    with pytest.raises(InvalidInput) as err:
        load_data(path)
    assert "has no lines" in err.value.message


def test_suffix_is_case_insensitive(tmp_path):
    path = jsonl(tmp_path / "DATA.JSONL", [{"q": 1}])
    assert load_data(path).rows == [{"q": 1}]


# --- load_data: folders ----------------------------------------------------------------------


def test_folder_concatenates_supported_files_by_name(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    jsonl(folder / "b.jsonl", [{"q": "b1"}, {"q": "b2"}])
    write(folder / "a.csv", "q\na1\n")
    write(folder / "c.json", '[{"q": "c1", "x": 1}]')
    write(folder / "README.md", "not data")
    write(folder / ".hidden.jsonl", '{"q": "hidden"}\n')
    (folder / "sub").mkdir()
    jsonl(folder / "sub" / "d.jsonl", [{"q": "nested"}])
    ds = load_data(folder)
    assert [r["q"] for r in ds.rows] == ["a1", "b1", "b2", "c1"]
    assert ds.columns == ["q", "x"]


def test_folder_malformed_line_names_the_file_inside(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    jsonl(folder / "a.jsonl", [{"q": 1}])
    write(folder / "b.jsonl", '{"q": 2}\nnope\n')
    with pytest.raises(InvalidInput) as err:
        load_data(folder)
    assert "b.jsonl line 2" in err.value.message
    ds = load_data(folder, skip_malformed=True)
    assert ds.rows == [{"q": 1}, {"q": 2}]
    assert ds.skipped[0][0] == 2 and "b.jsonl" in ds.skipped[0][1]


def test_folder_without_data_files(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write(folder / "notes.txt", "x")
    with pytest.raises(InvalidInput) as err:
        load_data(folder)
    assert "no data files" in err.value.message and ".jsonl" in err.value.message


def test_folder_of_empty_files_has_no_lines(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write(folder / "a.jsonl", "\n\n")
    with pytest.raises(InvalidInput) as err:
        load_data(folder)
    assert "has no lines" in err.value.message


# --- load_data: errors -----------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(InvalidInput) as err:
        load_data(tmp_path / "nope.jsonl")
    assert "nope.jsonl does not exist" in err.value.message
    assert "--data" in err.value.hint
    assert err.value.status == 422


def test_unsupported_suffix_names_it_and_the_supported_ones(tmp_path):
    path = write(tmp_path / "data.txt", '{"q": 1}\n')
    with pytest.raises(InvalidInput) as err:
        load_data(path)
    msg = err.value.message
    assert ".txt" in msg
    assert all(s in msg for s in (".jsonl", ".json", ".csv", ".tsv"))


def test_malformed_jsonl_line_number_and_reason(tmp_path):
    lines = [f'{{"q": {i}}}' for i in range(6)] + ['{"q": 1 "a": 2}', '{"q": 7}']
    path = write(tmp_path / "data.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(InvalidInput) as err:
        load_data(path)
    e = err.value
    assert "data.jsonl line 7 is not valid JSON" in e.message
    assert "Expecting ',' delimiter (column 9)" in e.message
    assert "--skip-malformed" in e.hint
    assert e.details == {"file": str(path), "line": 7}
    assert "Traceback" not in e.message + e.hint


def test_line_numbers_count_blank_lines(tmp_path):
    path = write(tmp_path / "data.jsonl", '{"q": 1}\n\n\n{bad\n')
    with pytest.raises(InvalidInput) as err:
        load_data(path)
    assert err.value.details["line"] == 4


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = write(tmp_path / "data.jsonl", '{"q": 1}\n[1, 2]\n')
    with pytest.raises(InvalidInput) as err:
        load_data(path)
    assert "line 2 is not a JSON object (it is a list)" in err.value.message


def test_skip_malformed_records_line_and_reason(tmp_path):
    path = write(tmp_path / "data.jsonl", '{"q": 1}\nnot json\n"a string"\n{"q": 4}\n')
    ds = load_data(path, skip_malformed=True)
    assert ds.rows == [{"q": 1}, {"q": 4}]
    assert [line for line, _ in ds.skipped] == [2, 3]
    assert "not valid JSON" in ds.skipped[0][1]
    assert "not a JSON object" in ds.skipped[1][1]


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_empty_file_has_no_lines(tmp_path, text):
    path = write(tmp_path / "data.jsonl", text)
    with pytest.raises(InvalidInput) as err:
        load_data(path)
    assert "data file" in err.value.message and "has no lines" in err.value.message
    assert err.value.hint


def test_everything_skipped_has_no_lines(tmp_path):
    path = write(tmp_path / "data.jsonl", "bad\nworse\n")
    with pytest.raises(InvalidInput) as err:
        load_data(path, skip_malformed=True)
    assert "has no lines" in err.value.message
    assert "2 lines are malformed" in err.value.message


def test_not_utf8(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"q": 1}\n{"q": "\xff"}\n')
    with pytest.raises(InvalidInput) as err:
        load_data(path)
    assert "line 2 is not UTF-8" in err.value.message
    assert "UTF-8" in err.value.hint


def test_load_100k_lines_keeps_every_row_in_order(tmp_path):
    """(How fast: bench/run_inputs.py.)"""
    path = tmp_path / "big.jsonl"
    path.write_text("".join(f'{{"q": "question {i}", "a": {i}}}\n' for i in range(100_000)))
    ds = load_data(path)
    assert len(ds.rows) == 100_000 and ds.rows[99_999] == {"q": "question 99999", "a": 99999}
    assert [r["a"] for r in ds.rows] == list(range(100_000))
    assert ds.columns == ["q", "a"]


# --- parse_mapping_args ----------------------------------------------------------------------


def test_parse_mapping_args():
    assert parse_mapping_args(["question=${data.q}", "k=literal", "eq=a=b", " sp =x", "e="]) == {
        "question": "${data.q}", "k": "literal", "eq": "a=b", "sp": "x", "e": ""}
    assert parse_mapping_args([]) == {}


@pytest.mark.parametrize("item", ["question", "=${data.q}", "  =x"])
def test_parse_mapping_args_bad_item(item):
    with pytest.raises(InvalidInput) as err:
        parse_mapping_args([item])
    assert repr(item) in err.value.message
    assert "key='${data.column}'" in err.value.hint


def test_parse_mapping_args_duplicate_key():
    with pytest.raises(InvalidInput) as err:
        parse_mapping_args(["q=${data.a}", "q=${data.b}"])
    assert "'q' is given twice" in err.value.message


# --- resolve_inputs: data --------------------------------------------------------------------


def test_data_references_and_literals():
    data = dataset([{"question": "q0", "ctx": "c0"}, {"question": "q1", "ctx": "c1"}])
    mapping = {"q": "${data.question}", "c": "  ${data.ctx}  ", "n": 3, "flag": True,
               "lst": [1, "${data.ctx}"], "s": "plain", "t": "see ${data.ctx} here"}
    got = resolve_inputs(inputs("q", "c", "n", "flag", "lst", "s", "t"), mapping, data, None)
    assert got == {
        0: {"q": "q0", "c": "c0", "n": 3, "flag": True, "lst": [1, "${data.ctx}"],
            "s": "plain", "t": "see ${data.ctx} here"},
        1: {"q": "q1", "c": "c1", "n": 3, "flag": True, "lst": [1, "${data.ctx}"],
            "s": "plain", "t": "see ${data.ctx} here"},
    }
    assert list(got) == [0, 1]


def test_default_mapping_by_name():
    data = dataset([{"question": "q0", "other": 1}])
    assert resolve_inputs(inputs("question"), None, data, None) == {0: {"question": "q0"}}
    assert describe_mapping(inputs("question"), {}, data, None) == {
        "question": "${data.question}"}


def test_explicit_mapping_wins_over_default_by_name():
    data = dataset([{"question": "q0", "alt": "a0"}])
    got = resolve_inputs(inputs("question"), {"question": "${data.alt}"}, data, None)
    assert got == {0: {"question": "a0"}}


def test_input_with_default_is_left_out_when_not_in_data():
    data = dataset([{"q": "q0"}])
    got = resolve_inputs(inputs("q", temperature=0.5), None, data, None)
    assert got == {0: {"q": "q0"}}


def test_an_input_with_a_default_keeps_it_unless_mapped_as_in_prompt_flow():
    """pf's batch runs: "default value is in higher priority than default mapping" -- a
    data column of the same name does not replace a default; a mapping does."""
    data = dataset([{"q": "q0", "temperature": 0.9}])
    assert resolve_inputs(inputs("q", temperature=0.5), None, data, None) == {0: {"q": "q0"}}
    assert describe_mapping(inputs("q", temperature=0.5), {}, data, None) == {
        "q": "${data.q}"}
    mapped = {"temperature": "${data.temperature}"}
    assert resolve_inputs(inputs("q", temperature=0.5), mapped, data, None) == {
        0: {"q": "q0", "temperature": 0.9}}


def test_input_with_none_default_counts_as_having_a_default():
    data = dataset([{"q": "q0"}])
    assert resolve_inputs(inputs("q", opt=None), None, data, None) == {0: {"q": "q0"}}
    # ... but a None default gives way to the data, as in prompt flow
    data = dataset([{"q": "q0", "opt": "o0"}])
    assert resolve_inputs(inputs("q", opt=None), None, data, None) == {
        0: {"q": "q0", "opt": "o0"}}


def test_input_without_value_is_an_error_naming_it():
    data = dataset([{"question": "q0", "context": "c"}])
    with pytest.raises(InvalidInput) as err:
        resolve_inputs(inputs("query"), None, data, None)
    e = err.value
    assert e.message == ("flow input 'query' has no value: the data has no column 'query' "
                         "and no column mapping names it")
    assert "--column-mapping query='${data.<column>}'" in e.hint
    assert "'question'" in e.hint and "'context'" in e.hint


def test_several_inputs_without_value_are_all_named():
    data = dataset([{"x": 1}])
    with pytest.raises(InvalidInput) as err:
        resolve_inputs(inputs("a", "b"), None, data, None)
    assert "'a'" in err.value.message and "'b'" in err.value.message


def test_missing_data_column_names_key_column_file_and_columns():
    data = dataset([{"question": "q0", "context": "c"}], name="/tmp/eval.jsonl")
    with pytest.raises(InvalidInput) as err:
        resolve_inputs(inputs("q"), {"q": "${data.qestion}"}, data, None)
    e = err.value
    assert "'q'" in e.message and "'qestion'" in e.message and "/tmp/eval.jsonl" in e.message
    assert "'question'" in e.hint and "'context'" in e.hint
    assert e.details["column"] == "qestion" and e.details["file"] == "/tmp/eval.jsonl"


def test_row_lacking_a_column_leaves_that_input_out_for_that_line():
    data = dataset([{"q": "q0", "ctx": "c0"}, {"q": "q1"}, {"q": "q2", "ctx": "c2"}])
    got = resolve_inputs(inputs("q", "ctx"), None, data, None)
    assert got == {0: {"q": "q0", "ctx": "c0"}, 1: {"q": "q1"}, 2: {"q": "q2", "ctx": "c2"}}


def test_extra_mapping_keys_are_passed_through():
    data = dataset([{"q": "q0", "meta": "m0"}])
    got = resolve_inputs(inputs("q"), {"not_an_input": "${data.meta}", "lit": "x"}, data, None)
    assert got == {0: {"q": "q0", "not_an_input": "m0", "lit": "x"}}


def test_extra_mapping_key_with_unknown_column_is_still_an_error():
    data = dataset([{"q": "q0"}])
    with pytest.raises(InvalidInput) as err:
        resolve_inputs(inputs("q"), {"extra": "${data.nope}"}, data, None)
    assert "'nope'" in err.value.message


@pytest.mark.parametrize("value", ["${data.}", "${foo.x}", "${run.outputs}", "${data}",
                                   "${parent.outputs.x}", "${ data.q }", "${run.x.y}",
                                   "${data.q"])
def test_malformed_reference(value):
    data = dataset([{"q": "q0"}])
    with pytest.raises(InvalidInput) as err:
        resolve_inputs(inputs("q"), {"q": value}, data, None)
    e = err.value
    assert "'q'" in e.message and value in e.message
    assert "${data.<column>}" in e.hint and "${run.outputs.<column>}" in e.hint
    assert "${run.inputs.<column>}" in e.hint


def test_data_reference_without_data():
    base = base_run({0: {"answer": "a0"}})
    with pytest.raises(InvalidInput) as err:
        resolve_inputs(inputs("x"), {"x": "${data.col}"}, None, base)
    assert err.value.message == "column mapping 'x' refers to ${data.col} but no data was given"


def test_run_reference_without_base_run():
    data = dataset([{"q": "q0"}])
    with pytest.raises(InvalidInput) as err:
        resolve_inputs(inputs("a"), {"a": "${run.outputs.answer}"}, data, None)
    assert "no base run" in err.value.message
    assert "--run" in err.value.hint and "run:" in err.value.hint


def test_neither_data_nor_base_run():
    with pytest.raises(InvalidInput) as err:
        resolve_inputs(inputs("q"), {"q": "x"}, None, None)
    assert err.value.message == "a run needs data or a base run"


def test_describe_mapping_shows_effective_mapping():
    data = dataset([{"q": "q0", "c": "c0"}])
    got = describe_mapping(inputs("q", "c", k=1), {"c": " ${data.q} ", "n": 2, "s": "x",
                                                    "o": {"a": [1]}}, data, None)
    assert got == {"q": "${data.q}", "c": "${data.q}", "n": "2", "s": "x", "o": '{"a": [1]}'}


# --- resolve_inputs: base runs ---------------------------------------------------------------


def test_base_run_outputs_join_by_line_and_drop_failed_lines():
    data = dataset([{"truth": f"t{i}"} for i in range(4)])
    base = base_run({0: {"answer": "a0"}, 2: {"answer": "a2"}, 3: {"answer": "a3"}})
    got = resolve_inputs(inputs("answer", "truth"), {"answer": "${run.outputs.answer}"},
                         data, base)
    assert got == {0: {"answer": "a0", "truth": "t0"}, 2: {"answer": "a2", "truth": "t2"},
                   3: {"answer": "a3", "truth": "t3"}}


def test_base_run_inputs_join_by_line():
    data = dataset([{"truth": f"t{i}"} for i in range(3)])
    base = base_run({0: {"answer": "a0"}}, inputs={0: {"q": "q0"}, 1: {"q": "q1"}})
    got = resolve_inputs(inputs("question", "truth"), {"question": "${run.inputs.q}"},
                         data, base)
    # inputs are known for lines 0 and 1 even though line 1 failed; line 2 never ran
    assert got == {0: {"question": "q0", "truth": "t0"}, 1: {"question": "q1", "truth": "t1"}}


def test_base_run_outputs_and_inputs_together():
    data = dataset([{"truth": f"t{i}"} for i in range(3)])
    base = base_run({1: {"answer": "a1"}, 2: {"answer": "a2"}},
                    inputs={0: {"q": "q0"}, 1: {"q": "q1"}, 2: {"q": "q2"}})
    got = resolve_inputs(inputs("q", "a", "truth"),
                         {"q": "${run.inputs.q}", "a": "${run.outputs.answer}"}, data, base)
    assert got == {1: {"q": "q1", "a": "a1", "truth": "t1"},
                   2: {"q": "q2", "a": "a2", "truth": "t2"}}


def test_base_run_lines_beyond_the_data_are_dropped():
    data = dataset([{"truth": "t0"}])
    base = base_run({0: {"answer": "a0"}, 1: {"answer": "a1"}})
    got = resolve_inputs(inputs("a", "truth"), {"a": "${run.outputs.answer}"}, data, base)
    assert got == {0: {"a": "a0", "truth": "t0"}}


def test_base_run_not_referenced_does_not_filter_lines():
    data = dataset([{"q": "q0"}, {"q": "q1"}])
    base = base_run({0: {"answer": "a0"}})
    assert resolve_inputs(inputs("q"), None, data, base) == {0: {"q": "q0"}, 1: {"q": "q1"}}


def test_base_run_only_uses_completed_lines():
    base = base_run({3: {"answer": "a3"}, 1: {"answer": "a1"}},
                    inputs={i: {"q": f"q{i}"} for i in range(4)})
    got = resolve_inputs(inputs("a", "q", k="d"),
                         {"a": "${run.outputs.answer}", "q": "${run.inputs.q}", "lit": 1},
                         None, base)
    assert got == {1: {"a": "a1", "q": "q1", "lit": 1}, 3: {"a": "a3", "q": "q3", "lit": 1}}
    assert list(got) == [1, 3]


def test_base_run_only_with_inputs_refs_uses_all_lines_that_ran():
    base = base_run({0: {"answer": "a0"}}, inputs={0: {"q": "q0"}, 1: {"q": "q1"}})
    got = resolve_inputs(inputs("q"), {"q": "${run.inputs.q}"}, None, base)
    assert got == {0: {"q": "q0"}, 1: {"q": "q1"}}


def test_base_line_lacking_an_output_leaves_that_input_out():
    base = base_run({0: {"answer": "a0", "score": 1}, 1: {"answer": "a1"}})
    got = resolve_inputs(inputs("s"), {"s": "${run.outputs.score}"}, None, base)
    assert got == {0: {"s": 1}, 1: {}}


def test_unknown_base_output_column_names_the_run():
    base = base_run({0: {"answer": "a0"}}, name="my_base")
    with pytest.raises(InvalidInput) as err:
        resolve_inputs(inputs("a"), {"a": "${run.outputs.answr}"}, None, base)
    e = err.value
    assert "'answr'" in e.message and "'my_base'" in e.message and "'a'" in e.message
    assert "'answer'" in e.hint
    assert e.details["column"] == "answr" and e.details["run"] == "my_base"


def test_unknown_base_input_column_names_the_run():
    base = base_run({0: {"answer": "a0"}}, inputs={0: {"q": "q0"}}, name="my_base")
    with pytest.raises(InvalidInput) as err:
        resolve_inputs(inputs("a"), {"a": "${run.inputs.question}"}, None, base)
    assert "'question'" in err.value.message and "'my_base'" in err.value.message
    assert "'q'" in err.value.hint


def test_base_only_input_without_value_lists_the_run_columns():
    base = base_run({0: {"answer": "a0"}}, name="my_base")
    with pytest.raises(InvalidInput) as err:
        resolve_inputs(inputs("answer"), None, None, base)
    assert "flow input 'answer' has no value" in err.value.message
    assert "${run.outputs.<column>}" in err.value.hint
    assert "'my_base'" in err.value.hint and "'answer'" in err.value.hint


# --- many rows -----------------------------------------------------------------------------------


def test_resolve_100k_rows_resolves_every_row_in_order():
    """(How fast: bench/run_inputs.py.)"""
    rows = [{"question": f"q{i}", "truth": f"t{i}", "unused": i} for i in range(100_000)]
    data = DataSet(path=Path("big.jsonl"), rows=rows, columns=["question", "truth", "unused"],
                   skipped=[])
    got = resolve_inputs(inputs("q", "truth", k=1), {"q": "${data.question}", "lit": "x"},
                         data, None)
    assert len(got) == 100_000
    assert got[99_999] == {"q": "q99999", "truth": "t99999", "lit": "x"}
    assert [got[i]["q"] for i in range(100_000)] == [f"q{i}" for i in range(100_000)]

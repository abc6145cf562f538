"""Load a batch run's data: a ``.jsonl`` / ``.json`` / ``.csv`` / ``.tsv`` file, or a folder of them.

Row ``i`` of the result is run line ``i`` (0-based), in file order; a folder's files are read
in name order and concatenated. Every problem is an ``InvalidInput`` naming the file and, when
there is one, the 1-based line, with a hint that says what to do. Malformed lines (bad JSON,
a JSON value that is not an object, a CSV row with the wrong number of values) stop the load
unless ``skip_malformed`` is set; then they are left out and listed in ``DataSet.skipped``.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowsession.errors import InvalidInput

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
_SUPPORTED_TEXT = ", ".join(SUPPORTED_SUFFIXES)
_SKIP_HINT = "fix the line, or skip malformed lines with --skip-malformed"
_CSV_FIELD_LIMIT = 1 << 30  # the csv module's default (128 KiB) is too small for long texts


@dataclass(frozen=True)
class DataSet:
    """The rows of a run's data. Treat the lists as read-only."""

    path: Path
    rows: list[dict[str, Any]]  # in file order; row i is run line i (0-based)
    columns: list[str]  # union of the rows' keys, in first-seen order
    # (1-based line number in its file, reason) of each malformed line that was skipped; when
    # the data is a folder the reason starts with the file's name ("b.jsonl: ...")
    skipped: list[tuple[int, str]]

    def skipped_lines(self, limit: int = 50) -> list[str]:
        """The skipped lines' numbers as a person finds them: ``"3"``, or ``"b.jsonl:3"`` in a
        folder of files; the first ``limit``."""
        return [f"{why.split(': ', 1)[0]}:{n}" if self.path.is_dir() else str(n)
                for n, why in self.skipped[:limit]]


def load_data(path: str | Path, *, skip_malformed: bool = False) -> DataSet:
    """Read a data file, or every supported file in a folder (by name, not recursive)."""
    root = Path(path)
    if not root.exists():
        raise InvalidInput(
            f"data file {root} does not exist",
            hint="check the path given as data: (run YAML) or --data; a relative path is "
                 "relative to the current folder",
            details={"file": str(root)},
        )
    if root.is_dir():
        files = sorted(
            (child for child in root.iterdir()
             if child.is_file() and not child.name.startswith(".")
             and child.suffix.lower() in SUPPORTED_SUFFIXES),
            key=lambda child: child.name,
        )
        if not files:
            raise InvalidInput(
                f"data folder {root} has no data files (supported: {_SUPPORTED_TEXT})",
                hint=f"put {_SUPPORTED_TEXT} files in the folder, or give a single data file",
                details={"file": str(root)},
            )
        in_folder = True
    else:
        if root.suffix.lower() not in SUPPORTED_SUFFIXES:
            suffix = root.suffix or "(none)"
            raise InvalidInput(
                f"data file {root} has an unsupported type {suffix}; supported: "
                f"{_SUPPORTED_TEXT}",
                hint="convert it to JSON Lines (.jsonl, one JSON object per line) or CSV "
                     "(.csv with a header row), or rename it if it already is one",
                details={"file": str(root), "suffix": root.suffix},
            )
        files = [root]
        in_folder = False

    rows: list[dict[str, Any]] = []
    skipped: list[tuple[int, str]] = []
    for file in files:
        reader = _READERS[file.suffix.lower()]
        reader(file, _read_text(file), rows, skipped, skip_malformed,
               f"{file.name}: " if in_folder else "")

    if not rows:
        what = "folder" if in_folder else "file"
        if skipped:
            raise InvalidInput(
                f"data {what} {root} has no lines: all {len(skipped)} lines are malformed "
                f"and were skipped (first: line {skipped[0][0]}: {skipped[0][1]})",
                hint="fix the data; without --skip-malformed the first bad line is reported "
                     "in full",
                details={"file": str(root), "skipped": len(skipped)},
            )
        raise InvalidInput(
            f"data {what} {root} has no lines",
            hint="add at least one line: a JSON object per line for .jsonl, a list of objects "
                 "for .json, a header row and at least one row for .csv / .tsv",
            details={"file": str(root)},
        )
    return DataSet(path=root, rows=rows, columns=_columns(rows), skipped=skipped)


# --- reading ----------------------------------------------------------------------------------


def _read_text(file: Path) -> str:
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise InvalidInput(
            f"data file {file} cannot be read: {exc.strerror or exc}",
            hint="check that the file exists and that you may read it",
            details={"file": str(file)},
        ) from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise InvalidInput(
            f"data file {file} line {line} is not UTF-8 text ({exc.reason})",
            hint="save the file with UTF-8 encoding",
            details={"file": str(file), "line": line},
        ) from None


def _malformed(file: Path, line: int, problem: str, skipped: list[tuple[int, str]],
               skip: bool, prefix: str) -> None:
    if skip:
        skipped.append((line, prefix + problem))
        return
    raise InvalidInput(f"{file} line {line} {problem}", hint=_SKIP_HINT,
                       details={"file": str(file), "line": line})


def _read_jsonl(file: Path, text: str, rows: list[dict[str, Any]],
                skipped: list[tuple[int, str]], skip: bool, prefix: str) -> None:
    loads = json.loads
    append = rows.append
    # split on "\n" only: str.splitlines() would also split on U+2028 etc., which JSON allows
    # unescaped inside strings
    for number, line in enumerate(text.split("\n"), 1):
        if not line or line.isspace():
            continue
        try:
            value = loads(line)
        except json.JSONDecodeError as exc:
            problem = f"is not valid JSON: {exc.msg} (column {exc.colno})"
        else:
            if type(value) is dict:
                append(value)
                continue
            problem = f"is not a JSON object (it is {_kind(value)})"
        _malformed(file, number, problem, skipped, skip, prefix)


def _read_json(file: Path, text: str, rows: list[dict[str, Any]],
               skipped: list[tuple[int, str]], skip: bool, prefix: str) -> None:
    if not text.strip():
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(
            f"{file} line {exc.lineno} is not valid JSON: {exc.msg} (column {exc.colno})",
            hint="fix the file: a .json data file holds a list of objects (or one object); "
                 "for one object per line use .jsonl",
            details={"file": str(file), "line": exc.lineno},
        ) from None
    if type(value) is dict:
        rows.append(value)
        return
    if type(value) is not list:
        raise InvalidInput(
            f"{file} holds {_kind(value)}; a .json data file must hold a list of objects "
            "(or one object)",
            hint='write it as [{"column": value, ...}, ...]',
            details={"file": str(file)},
        )
    for index, item in enumerate(value):
        if type(item) is not dict:
            raise InvalidInput(
                f"{file}: item {index + 1} of the list is not a JSON object (it is "
                f"{_kind(item)})",
                hint='every item must be an object such as {"column": value}; fix or remove it',
                details={"file": str(file), "item": index + 1},
            )
    rows.extend(value)


def _read_delimited(delimiter: str):
    def read(file: Path, text: str, rows: list[dict[str, Any]],
             skipped: list[tuple[int, str]], skip: bool, prefix: str) -> None:
        if csv.field_size_limit() < _CSV_FIELD_LIMIT:
            csv.field_size_limit(_CSV_FIELD_LIMIT)
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
        header: list[str] | None = None
        header_line = width = 0
        last_line = 0  # records may span lines (quoted newlines): a record starts after the last
        while True:
            try:
                record = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                line = last_line + 1
                raise InvalidInput(
                    f"{file} line {line} cannot be read: {exc}",
                    hint="fix the line (check its quotes)",
                    details={"file": str(file), "line": line},
                ) from None
            start, last_line = last_line + 1, reader.line_num
            if not record or (len(record) == 1 and not record[0].strip()
                              and (header is None or len(header) > 1)):
                continue  # a blank line
            if header is None:
                header, header_line = record, start
                _check_header(file, start, header)
                width = len(header)
                continue
            if len(record) != width:
                problem = (f"has {len(record)} values but the header (line {header_line}) "
                           f"has {width} columns")
                _malformed(file, start, problem, skipped, skip, prefix)
                continue
            rows.append(dict(zip(header, record)))

    return read


def _check_header(file: Path, line: int, header: list[str]) -> None:
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise InvalidInput(
                f"{file} line {line}: the header names column '{name}' twice",
                hint="give every column a different name",
                details={"file": str(file), "line": line, "column": name},
            )
        seen.add(name)


_READERS = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_delimited(","),
    ".tsv": _read_delimited("\t"),
}


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    last_keys: Any = None
    for row in rows:
        keys = row.keys()
        if keys == last_keys:  # the common case: every row has the same keys
            continue
        last_keys = keys
        for key in keys:
            if key not in seen:
                seen[key] = None
    return list(seen)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"

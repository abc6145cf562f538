"""A run's files under ``<home>/runs/<name>/``: the durable side of a run.

- ``inputs.jsonl``: one JSON object of inputs per line, in position order (a line's position
  is its number in this file); the session gets a copy.
- ``line_numbers.json``: position -> line number, when they differ (a run over a base run whose
  lines partly failed keeps the base run's line numbers).
- ``lines.jsonl``: every result record collected from the sessions (as data, validated by the
  backend: ``backends.compute.boundary.record``), each position once.
- ``collect.json``: the backend's cursor: how far the sessions' records have been collected.
- ``outputs.jsonl``: written when the run ends: ``{"line_number": n, <outputs>}`` per completed
  line, in order. ``metrics.json``: the aggregation's metrics. ``logs/``: the run's log and
  its workers' logs.

Collecting is idempotent and safe to repeat after a crash: records are appended before the
cursors move, and a position already in ``lines.jsonl`` is never appended again, so no line is
stored twice. Collectors in different processes take the folder's lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from flowsession.backends.compute.boundary import Collected
from flowsession.environments import fsops

INPUTS, LINE_NUMBERS, LINES, CURSORS = ("inputs.jsonl", "line_numbers.json", "lines.jsonl",
                                        "collect.json")
OUTPUTS, METRICS, LOGS, RUN_LOG = "outputs.jsonl", "metrics.json", "logs", "run.log"
THROTTLE = "throttle.json"  # the session's last word on 429s
MAX_ERRORS = 5
MAX_LOGS = 64 * 1024 * 1024  # the workers' log text a run keeps
MAX_LOG_FILES = 256  # the workers' log files a run keeps (any further: OTHER_LOGS)
OTHER_LOGS = "worker-others.log"


class RunFiles:
    def __init__(self, root: Path):
        self.root = root
        self._known: set[int] = set()
        self._ok = 0
        self._errors: list[list[Any]] = []
        self._read_upto = 0  # how much of lines.jsonl is in _known
        self._usage: dict[str, int] = {}  # the stored lines' token counts, summed
        self._numbers: list[int] | None = None

    # --- inputs ----------------------------------------------------------------------------

    def write_inputs(self, lines: Mapping[int, Mapping[str, Any]]) -> int:
        """Positions 0..n-1 in line-number order; returns n."""
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / LOGS).mkdir(exist_ok=True)
        numbers = sorted(lines)
        tmp = self.root / f".{INPUTS}.tmp"
        with open(tmp, "w") as out:
            for n in numbers:
                out.write(json.dumps(lines[n], default=str, separators=(",", ":")) + "\n")
        if numbers != list(range(len(numbers))):
            (self.root / LINE_NUMBERS).write_text(json.dumps(numbers))
        os.rename(tmp, self.root / INPUTS)  # last: a run whose inputs exist is complete
        return len(numbers)

    @property
    def inputs_path(self) -> Path:
        return self.root / INPUTS

    def has_inputs(self) -> bool:
        return (self.root / INPUTS).is_file()

    def line_number(self, pos: int) -> int:
        if self._numbers is None:
            try:
                self._numbers = json.loads((self.root / LINE_NUMBERS).read_text())
            except FileNotFoundError:
                self._numbers = []
        return self._numbers[pos] if self._numbers else pos

    def positions(self) -> int:
        with open(self.root / INPUTS, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))

    def iter_inputs(self) -> Iterator[dict[str, Any]]:
        """Each line's inputs; none for a run that failed before they were stored."""
        try:
            f = open(self.root / INPUTS)
        except FileNotFoundError:
            return
        with f:
            for raw in f:
                yield json.loads(raw)

    # --- collecting ------------------------------------------------------------------------

    def locked(self) -> contextlib.AbstractContextManager[None]:
        return fsops.locked(self.root / ".lock")

    @contextlib.contextmanager
    def finishing(self) -> Iterator[bool]:
        """True for the one process (or task) that may finish the run now; False while
        another one is finishing it (aggregating, writing the outputs)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".finish.lock", "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _catch_up(self) -> None:
        """Read what was appended to lines.jsonl since we last looked (by anyone)."""
        try:
            with open(self.root / LINES, "rb") as f:
                f.seek(self._read_upto)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1
        for raw in data[:end].split(b"\n")[:-1]:
            self._note(json.loads(raw))
        self._read_upto += end

    def _note(self, rec: dict[str, Any]) -> None:
        self._known.add(rec["i"])
        for k, v in (rec.get("u") or {}).items():
            self._usage[k] = self._usage.get(k, 0) + v
        if rec.get("ok"):
            self._ok += 1
        else:  # the first errors by line number, whichever worker stored them first
            self._errors.append([self.line_number(rec["i"]), rec.get("error")])
            self._errors.sort(key=lambda e: e[0])
            del self._errors[MAX_ERRORS:]

    def cursor(self) -> dict[str, int]:
        """Where collecting from the sessions stopped (the backend's keys)."""
        return _read_json(self.root / CURSORS) or {}

    def store(self, collected: Collected) -> int:
        """Append the new records of ``collected`` (validated by the backend), keep its log
        text, then move the cursor; how many records were new."""
        with self.locked():
            new = self._append(collected.records)
            if collected.logs:
                self._keep_logs(collected.logs)
            _write_json(self.root / CURSORS, collected.cursor)
            return new

    def _append(self, records: Iterable[bytes]) -> int:
        """Append (and sync) the records of positions not stored yet; under ``locked``."""
        self._catch_up()
        new: list[bytes] = []
        for raw in records:
            rec = json.loads(raw)
            if rec["i"] not in self._known:
                self._note(rec)
                new.append(raw)
        if new:
            with open(self.root / LINES, "ab") as out:
                out.write(b"\n".join(new) + b"\n")
                out.flush()
                os.fsync(out.fileno())
            self._read_upto += sum(len(r) + 1 for r in new)
        return len(new)

    def _keep_logs(self, texts: Mapping[str, str]) -> None:
        """Workers' log text, each appended to ``logs/worker-<name>.log`` within the run's log
        budget (past it, one line says what was left out). A run keeps at most
        MAX_LOG_FILES workers' logs; text of any further worker goes, named, into
        ``worker-others.log`` (a session may plant thousands of tiny logs)."""
        logs = self.root / LOGS
        logs.mkdir(parents=True, exist_ok=True)
        sizes = {p.name: p.stat().st_size for p in logs.glob("worker-*.log")}
        used = sum(sizes.values())
        for worker, text in texts.items():
            room = MAX_LOGS - used
            if room <= 0:
                return
            name = "".join(c for c in worker if c.isalnum() or c in "_-")[:40] or "worker"
            file = f"worker-{name}.log"
            data = text.encode()
            if file not in sizes and len(sizes) >= MAX_LOG_FILES:
                file, data = OTHER_LOGS, f"[{name}] ".encode() + data
            if len(data) > room:
                data = data[:room] + (f"\n[log cut: the run's worker logs reached "
                                      f"{MAX_LOGS // (1024 * 1024)} MB]\n").encode()
            with open(logs / file, "ab") as f:
                f.write(data)
            sizes[file] = sizes.get(file, 0) + len(data)
            used += len(data)

    def adopt(self, records: Iterable[bytes]) -> int:
        """Store records taken from another run (``--resume-from``)."""
        with self.locked():
            return self._append(records)

    def counts(self) -> tuple[int, int, list[list[Any]]]:
        """(completed, failed, first errors) of what is stored."""
        with self.locked():
            self._catch_up()
        return self._ok, len(self._known) - self._ok, list(self._errors)

    def usage(self) -> dict[str, int]:
        """The stored lines' token counts (prompt, completion, total), summed."""
        with self.locked():
            self._catch_up()
        return {k: self._usage.get(k, 0) for k in ("prompt_tokens", "completion_tokens",
                                                    "total_tokens")}

    def write_throttle(self, info: Mapping[str, Any]) -> None:
        _write_json(self.root / THROTTLE, dict(info))

    def throttle(self) -> dict[str, Any] | None:
        """What the session said of the endpoint's rate limits (429s), if it said anything."""
        return _read_json(self.root / THROTTLE)

    def stored(self) -> set[int]:
        with self.locked():
            self._catch_up()
        return set(self._known)

    def records(self) -> dict[int, dict[str, Any]]:
        """Every stored record by position."""
        out: dict[int, dict[str, Any]] = {}
        try:
            with open(self.root / LINES, "rb") as f:
                for raw in f:
                    if raw.endswith(b"\n"):
                        rec = json.loads(raw)
                        out.setdefault(rec["i"], rec)
        except FileNotFoundError:
            pass
        return out

    def raw_records(self) -> Iterator[bytes]:
        try:
            with open(self.root / LINES, "rb") as f:
                for raw in f:
                    if raw.endswith(b"\n"):
                        yield raw.rstrip(b"\n")
        except FileNotFoundError:
            return

    # --- the end ---------------------------------------------------------------------------

    def write_outputs(self) -> None:
        records = self.records()
        tmp = self.root / f".{OUTPUTS}.tmp"
        with open(tmp, "w") as out:
            for pos in sorted(records):
                rec = records[pos]
                if rec.get("ok"):
                    row = {"line_number": self.line_number(pos), **(rec.get("output") or {})}
                    out.write(json.dumps(row, default=str, ensure_ascii=False) + "\n")
        os.rename(tmp, self.root / OUTPUTS)

    def write_metrics(self, metrics: Mapping[str, Any]) -> None:
        _write_json(self.root / METRICS, dict(metrics))

    def metrics(self) -> dict[str, Any]:
        return _read_json(self.root / METRICS) or {}

    def outputs(self) -> list[dict[str, Any]]:
        try:
            with open(self.root / OUTPUTS) as f:
                return [json.loads(line) for line in f]
        except FileNotFoundError:
            return []

    def log(self, message: str) -> None:
        (self.root / LOGS).mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        with open(self.root / LOGS / RUN_LOG, "a") as f:
            f.write(f"{stamp} {message}\n")

    def log_files(self) -> list[Path]:
        logs = self.root / LOGS
        run_log = logs / RUN_LOG
        workers = sorted(p for p in logs.glob("*.log") if p.name != RUN_LOG)
        return [p for p in [run_log, *workers] if p.is_file()]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    os.rename(tmp, path)

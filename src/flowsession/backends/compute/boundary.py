"""What crosses from a session to the control plane: data, validated and bounded here.

A session runs hostile code. Everything it can write -- files, symlinks, log text, records,
reasons, sizes, exit codes -- is untrusted. Backends hand the control plane only what this
module let through:

- **records** (one per line of a run): a JSON object with an int position inside the run,
  ``ok`` a bool, an ``output`` object or an ``error`` text, a duration; at most
  ``MAX_RECORD`` bytes each (a larger one becomes a failed record that says so);
- **text** (logs, reasons): decoded with replacement, control characters dropped, cut to a
  limit;
- **files** read from a session-writable folder (the local backend, for a session that has
  ended): opened relative to a directory descriptor with ``O_NOFOLLOW | O_NONBLOCK``, regular
  files only, never more than asked for. A symlink, FIFO, device or socket planted there is
  skipped, never followed or waited on.

Control plane code; stdlib only.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from flowsession.worker.protocol import RunState

MAX_RECORD = 8 * 1024 * 1024  # one line's record (its outputs), as JSON
MAX_COLLECT = 16 * 1024 * 1024  # records and log text one collect may bring
MAX_LOG_NAMES = 64  # workers' logs one collect may bring (a session may plant thousands)
MAX_CURSOR_KEYS = 1024  # files a session's cursor may name (one per worker and its log)
MAX_REASON = 500  # a session's one-line reason (why it ended, why it failed)
MAX_ERROR = 4000  # a line's error text


@dataclass(frozen=True)
class Collected:
    """What one ``collect`` brought: validated records (JSON lines), log text per worker,
    the cursor to pass next time, and whether more is waiting."""

    records: list[bytes] = field(default_factory=list)
    logs: dict[str, str] = field(default_factory=dict)
    cursor: dict[str, int] = field(default_factory=dict)
    more: bool = False
    refused: int = 0  # records that were not valid data (counted, never stored)


# --- text --------------------------------------------------------------------------------------

_CONTROL = {c: None for c in range(32) if c not in (9, 10)} | {127: None}


def text(value: Any, limit: int, *, one_line: bool = False) -> str:
    """``value`` as printable text of at most ``limit`` characters."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    elif not isinstance(value, str):
        value = "" if value is None else str(value)
    value = value[: limit * 4].translate(_CONTROL)
    if one_line:
        value = " ".join(value.split())
    return value if len(value) <= limit else value[: limit - 1] + "…"


def reason(value: Any) -> str:
    """A session's reason, as the control plane may store and show it."""
    return text(value, MAX_REASON, one_line=True)


# --- records ---------------------------------------------------------------------------------


def record(raw: bytes | str | Mapping[str, Any], total: int) -> bytes | None:
    """One line's record as the JSON line to store, or None when it is not a record of a
    position below ``total``. An oversized record becomes a failed one that says why."""
    if isinstance(raw, Mapping):
        obj: Any = raw
        size = 0
    else:
        size = len(raw)
        if size > MAX_RECORD:
            pos = _leading_position(raw)
            if pos is None or not 0 <= pos < total:
                return None
            return _dump({"i": pos, "ok": False, "d": 0,
                          "error": f"the line's record is {size} bytes, over the limit of "
                                   f"{MAX_RECORD // (1024 * 1024)} MB: its outputs are too "
                                   "large to store"})
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError):
            return None
    if not isinstance(obj, Mapping):
        return None
    pos = obj.get("i")
    if type(pos) is not int or not 0 <= pos < total or type(obj.get("ok")) is not bool:
        return None
    d = obj.get("d", 0)
    duration = float(d) if type(d) in (int, float) and math.isfinite(d) and d >= 0 else 0.0
    if obj["ok"]:
        out: dict[str, Any] = {"i": pos, "ok": True, "d": duration}
        if not isinstance(obj.get("output"), Mapping):
            return None
        out["output"] = obj["output"]
        if "agg" in obj:
            if not isinstance(obj["agg"], Mapping):
                return None
            out["agg"] = obj["agg"]
    else:
        out = {"i": pos, "ok": False, "d": duration, "error": text(obj.get("error"), MAX_ERROR)}
    usage = _usage(obj.get("u"))
    if usage:
        out["u"] = usage
    try:
        data = _dump(out)
    except (ValueError, TypeError, RecursionError):
        return None
    if len(data) > MAX_RECORD:
        return _dump({"i": pos, "ok": False, "d": duration,
                      "error": f"the line's record is over the limit of "
                               f"{MAX_RECORD // (1024 * 1024)} MB: its outputs are too large "
                               "to store"})
    return data


MAX_TRACE_NODES = 1000  # nodes a test's trace may name


def seconds(value: Any) -> float | None:
    """A duration a session sent: a finite, non-negative number, else None."""
    ok = type(value) in (int, float) and math.isfinite(value) and value >= 0
    return float(value) if ok else None


def trace(value: Any) -> list[dict[str, Any]]:
    """A test's trace as a session sent it, kept to its known fields and their types (node
    and status short text, an error bounded, a duration a number); what is not a list of
    objects is no trace."""
    if not isinstance(value, list):
        return []
    out = []
    for item in value[:MAX_TRACE_NODES]:
        if not isinstance(item, Mapping):
            continue
        inputs, tokens = item.get("inputs"), item.get("tokens")
        out.append({"node": text(item.get("node"), 200, one_line=True),
                    "tokens": {text(k, 40): v for k, v in tokens.items()
                               if type(v) is int and 0 <= v < 2**53}
                    if isinstance(tokens, Mapping) else {},
                    "status": text(item.get("status"), 40, one_line=True),
                    "inputs": dict(inputs) if isinstance(inputs, Mapping) else {},
                    "output": item.get("output"),
                    "duration": seconds(item.get("duration")),
                    "error": text(item.get("error"), MAX_ERROR) if item.get("error") else None})
    return out


def _dump(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode()


def _leading_position(raw: bytes | str) -> int | None:
    """The ``"i"`` of a record too large to parse (records start with it)."""
    head = raw[:64].decode(errors="replace") if isinstance(raw, bytes) else raw[:64]
    if not head.startswith('{"i":'):
        return None
    digits = ""
    for c in head[5:]:
        if not c.isdigit():
            break
        digits += c
    return int(digits) if digits and len(digits) < 12 else None


USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")


def _usage(obj: Any) -> dict[str, int]:
    """A line's token counts: known keys, whole numbers in range; the rest is dropped."""
    if not isinstance(obj, Mapping):
        return {}
    return {k: obj[k] for k in USAGE_KEYS if type(obj.get(k)) is int and 0 <= obj[k] < 1 << 40}


def run_progress(obj: Any) -> dict[str, Any] | None:
    """The supervisor's view of a run, with every field of the right type (None: unknown)."""
    if not isinstance(obj, Mapping):
        return None
    try:
        state = RunState(obj.get("state"))
    except ValueError:
        return None

    def count(key: str) -> int:
        v = obj.get(key)
        return v if type(v) is int and v >= 0 else 0

    errors = obj.get("errors") if isinstance(obj.get("errors"), list) else []
    return {"state": state, "total": count("total"), "done": count("done"),
            "failed": count("failed"), "workers": count("workers"),
            "restarts": count("restarts"), "concurrency": count("concurrency"),
            "in_flight_limit": count("in_flight_limit"), "throttled": count("throttled"),
            "throttled_at": obj["throttled_at"] if type(obj.get("throttled_at")) in (int, float)
            and 0 < obj["throttled_at"] < 1e11 else None,
            "error": reason(obj["error"]) if obj.get("error") else None,
            "errors": [[e[0], text(e[1], MAX_ERROR)] for e in errors[:10]
                       if isinstance(e, list) and len(e) == 2 and type(e[0]) is int]}


# --- files in a session-writable folder --------------------------------------------------------


@contextlib.contextmanager
def open_dir(path: str | os.PathLike, *, at: int | None = None) -> Iterator[int | None]:
    """A descriptor of the directory ``path`` (relative to ``at`` when given), or None when
    it is missing, not a directory, or a symlink."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=at)
    except OSError:
        yield None
        return
    try:
        yield fd
    finally:
        os.close(fd)


def entries(dir_fd: int) -> list[str]:
    """The names in a directory (never followed)."""
    try:
        return sorted(os.listdir(dir_fd))
    except OSError:
        return []


def read_file(dir_fd: int, name: str, *, limit: int, offset: int = 0,
              tail: bool = False) -> tuple[bytes, int] | None:
    """Up to ``limit`` bytes of the regular file ``name`` in ``dir_fd`` from ``offset`` (or
    its last ``limit`` bytes with ``tail``), and the file's size; None for anything that is
    not a regular file (a symlink, FIFO, device, socket, directory) or cannot be read."""
    if "/" in name or name in ("", ".", ".."):
        return None
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY,
                     dir_fd=dir_fd)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        size = st.st_size
        start = max(0, size - limit) if tail else min(max(0, offset), size)
        chunks, left = [], min(limit, size - start)
        os.lseek(fd, start, os.SEEK_SET)
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks), size
    except OSError:
        return None
    finally:
        os.close(fd)


def read_json(dir_fd: int | None, name: str, *, limit: int = 64 * 1024) -> dict[str, Any] | None:
    """A small JSON object from a session-writable folder, or None."""
    if dir_fd is None:
        return None
    got = read_file(dir_fd, name, limit=limit)
    if got is None or got[1] > limit:
        return None
    try:
        obj = json.loads(got[0])
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def tail_text(dir_fd: int | None, name: str, *, lines: int, limit: int = 64 * 1024) -> str:
    """The last ``lines`` lines of a log in a session-writable folder, as safe text."""
    if dir_fd is None:
        return ""
    got = read_file(dir_fd, name, limit=limit, tail=True)
    if got is None:
        return ""
    tail = got[0].decode("utf-8", errors="replace").strip().splitlines()[-lines:]
    return "\n".join(text(line, 1000) for line in tail)

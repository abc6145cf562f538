"""How the CLI prints: Rich tables for people, ``--json`` for programs, errors with a hint."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from flowsession.config import Settings
from flowsession.errors import EnvironmentError_, FlowSessionError, InvalidInput

out = Console()
err = Console(stderr=True)
for _console in (out, err):  # a pipe or a file: lines whole, never wrapped at a made-up width
    if not _console.is_terminal:
        _console.soft_wrap = True
log = logging.getLogger("flowsession.cli")


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def piped() -> bool:
    """Is stdout a pipe or a file (not a terminal)? Then output is printed whole."""
    return not out.is_terminal


def _tsv_cell(value: object) -> str:
    text = "" if value is None else str(value)
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n") \
        .replace("\r", "\\r")


def table(rows: Iterable[dict], columns: Sequence[str], *, title: str | None = None) -> None:
    """A table: in a terminal, a Rich table fitted to its width; through a pipe or into a
    file, whole and tab-separated (a header line, then one line per row; tabs and newlines
    in values escaped), as gh and kubectl print, the title left to stderr."""
    if piped():
        if title:
            err.print(title, highlight=False, markup=False)
        lines = ["\t".join(columns)]
        lines += ["\t".join(_tsv_cell(row.get(c)) for c in columns) for row in rows]
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()
        return
    t = Table(title=title, header_style="bold")
    for i, col in enumerate(columns):  # the first column names the thing: never cut it
        t.add_column(col.replace("_", " "), no_wrap=i == 0)
    for row in rows:
        t.add_row(*("" if row.get(c) is None else str(row.get(c)) for c in columns))
    out.print(t)


def fields(data: dict, keys: Sequence[str]) -> None:
    """'key: value' lines for the keys that have a value (the text form of a show command)."""
    for key in keys:
        if data.get(key) not in (None, ""):
            out.print(f"[bold]{key.replace('_', ' ')}:[/] {data[key]}", highlight=False)


@contextmanager
def progress(message: str, *, lines: bool = False) -> Iterator[Callable[[dict], None]]:
    """A Rich status on stderr while a long operation runs; the ``on_progress`` it yields
    shows the operation's progress events (``{"message": ...}``) beside ``message``; with
    ``lines``, each one is also printed as a line (a build's steps and packages), so a pipe
    or a log sees them too."""
    with err.status(message) as status:
        def on_progress(event: dict) -> None:
            detail = event.get("message")
            if detail and lines:
                err.print(f"  {detail}", highlight=False, markup=False, style="dim")
            if detail:
                status.update(f"{message.rstrip(' .')}: {detail[:60]} ...")

        yield on_progress


def _log_traceback() -> Path:
    path = Settings.from_env().logs_dir / "cli.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}\n")
        fh.write(traceback.format_exc())
    return path


def handle_errors(fn: Callable) -> Callable:
    """User errors print a message and a hint (exit 1, or 2 for bad input); anything else is a
    bug: one line for the user, the traceback to the log."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FlowSessionError as exc:
            if exc.code == "server_unreachable" and not os.environ.get("FLOWSESSION_URL"):
                exc.hint = ("this home's local server went away (its log: "
                            f"{Settings.from_env().logs_dir / 'server.log'}); run the command "
                            "again: it starts the server again")
            err.print(f"[bold red]error:[/] {exc.message}", highlight=False, markup=True)
            if isinstance(exc, EnvironmentError_) and exc.log_tail:
                err.print("[dim]--- last lines of the build log"
                          + (f" ({exc.log_path})" if exc.log_path else "") + " ---[/]")
                err.print(exc.log_tail, highlight=False, markup=False, style="dim")
            if exc.hint:
                err.print(f"[yellow]hint:[/] {exc.hint}", highlight=False)
            raise typer.Exit(2 if isinstance(exc, InvalidInput) else 1) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort, typer.TyperException):  # usage errors: Click prints them
            raise
        except Exception as exc:  # a bug: one line for the user, the traceback to the log
            path = _log_traceback()
            err.print(f"[bold red]error:[/] unexpected failure: {type(exc).__name__}: {exc}",
                      highlight=False)
            err.print(f"[yellow]hint:[/] the details are in {path}; please report them",
                      highlight=False)
            raise typer.Exit(1) from None

    return wrapper

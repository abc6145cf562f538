"""``flowsession connection ...``: prompt flow connections (secrets always masked), through the
server (see ``cli/connect.py``). A file's ``${env:VAR}`` is read here, from the command's own
environment, before anything is sent."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import typer
from rich.markup import escape

from flowsession.access import MASK
from flowsession.cli.connect import client
from flowsession.cli.output import emit_json, handle_errors, out, table

app = typer.Typer(no_args_is_help=True)
JSON = typer.Option(False, "--json", help="Print machine-readable JSON.")


def _when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else ""


def _print(conn: dict) -> None:
    """'key: value' lines, as ``fields`` prints them; each secret as ******."""
    lines: list[tuple[str, str]] = [("name", conn["name"]), ("type", conn["type"])]
    if conn["type"] == "custom":
        lines += [(f"configs.{k}", v) for k, v in (conn.get("configs") or {}).items()]
        lines += [(f"secrets.{k}", MASK) for k in (conn.get("secrets") or {})]
    else:
        lines += [(k.replace("_", " "), conn[k]) for k in _typed_fields(conn)]
    lines += [("owner", conn.get("owner")), ("created", _when(conn.get("created_at"))),
              ("updated", _when(conn.get("updated_at")))]
    for key, value in lines:
        if value not in (None, ""):
            out.print(f"[bold]{escape(key)}:[/] {escape(str(value))}", highlight=False)


_NOT_FIELDS = {"name", "type", "owner", "created_at", "updated_at", "created", "configs",
               "secrets", "secret_keys"}


def _typed_fields(conn: dict) -> list[str]:
    """A typed connection's fields as the API shows them: secrets (masked) first."""
    keys = [k for k in conn if k not in _NOT_FIELDS]
    return sorted(keys, key=lambda k: conn[k] != MASK)


def _secret_keys(conn: dict) -> list[str]:
    if conn["type"] == "custom":
        return list(conn.get("secrets") or {})
    return [k for k in _typed_fields(conn) if conn[k] == MASK]


def _row(conn: dict) -> dict:
    return {"name": conn["name"], "type": conn["type"],
            "endpoint": conn.get("base_url") or conn.get("api_base") or
            (conn.get("configs") or {}).get("base_url") or "",
            "secrets": ", ".join(_secret_keys(conn)), "created": _when(conn.get("created_at"))}


@app.command()
@handle_errors
def create(
    file: Path = typer.Option(..., "--file", "-f", help="The connection's YAML (prompt flow's "
                              "format: name, type, api_key, ...)."),
    name: str = typer.Option(None, "--name", help="Use this name instead of the file's."),
    json: bool = JSON,
) -> None:
    """Create a connection from a YAML file, or update yours of the same name.

    A secret may be written ${env:VARIABLE}: it is read from the environment now."""
    with client() as c:
        conn = c.create_connection(file, name=name)
    if json:
        return emit_json(conn)
    created = conn.pop("created", False)
    out.print(f"{'created' if created else 'updated'} connection {conn['name']} "
              f"({conn['type']})", highlight=False)
    _print(conn)


@app.command("list")
@handle_errors
def list_(json: bool = JSON) -> None:
    """List your connections (every user's, if you manage everything); secrets are never
    shown."""
    with client() as c:
        conns = c.list_connections()
    if json:
        return emit_json(conns)
    table([_row(c) for c in conns], ["name", "type", "endpoint", "secrets", "created"])


@app.command()
@handle_errors
def show(name: str, json: bool = JSON) -> None:
    """Show one connection, its secrets masked."""
    with client() as c:
        conn = c.get_connection(name)
    if json:
        return emit_json(conn)
    _print(conn)


@app.command()
@handle_errors
def delete(name: str, json: bool = JSON) -> None:
    """Delete one of your connections."""
    with client() as c:
        c.delete_connection(name)
    if json:
        return emit_json({"name": name, "deleted": True})
    out.print(f"deleted connection {name}", highlight=False)

"""``flowsession connection ...``: prompt flow connections (secrets always masked)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import typer
from rich.markup import escape

from flowsession.access.connections import MASK, Connection, ConnectionService
from flowsession.cli.output import emit_json, handle_errors, out, table

app = typer.Typer(no_args_is_help=True)
JSON = typer.Option(False, "--json", help="Print machine-readable JSON.")


def _when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else ""


def _print(conn: Connection) -> None:
    """'key: value' lines, as ``fields`` prints them; each secret as ******."""
    lines: list[tuple[str, str]] = [("name", conn.name), ("type", conn.type)]
    if conn.type == "custom":
        lines += [(f"configs.{k}", v) for k, v in conn.configs.items()]
        lines += [(f"secrets.{k}", MASK) for k in conn.secret_keys]
    else:
        lines += [(k.replace("_", " "), MASK) for k in conn.secret_keys]
        lines += [(k.replace("_", " "), v) for k, v in conn.configs.items()]
    lines += [("owner", conn.owner), ("created", _when(conn.created_at)),
              ("updated", _when(conn.updated_at))]
    for key, value in lines:
        if value not in (None, ""):
            out.print(f"[bold]{escape(key)}:[/] {escape(str(value))}", highlight=False)


def _row(conn: Connection) -> dict:
    return {"name": conn.name, "type": conn.type,
            "endpoint": conn.configs.get("base_url") or conn.configs.get("api_base") or "",
            "secrets": ", ".join(conn.secret_keys), "created": _when(conn.created_at)}


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
    svc = ConnectionService.open()
    conn, created = svc.create_from_file(file, owner=svc.settings.user, name=name)
    if json:
        return emit_json({**conn.to_dict(), "created": created})
    out.print(f"{'created' if created else 'updated'} connection {conn.name} ({conn.type})",
              highlight=False)
    _print(conn)


@app.command("list")
@handle_errors
def list_(json: bool = JSON) -> None:
    """List your connections (secrets are never shown)."""
    svc = ConnectionService.open()
    conns = svc.list(svc.settings.user)
    if json:
        return emit_json([c.to_dict() for c in conns])
    table([_row(c) for c in conns], ["name", "type", "endpoint", "secrets", "created"])


@app.command()
@handle_errors
def show(name: str, json: bool = JSON) -> None:
    """Show one connection, its secrets masked."""
    svc = ConnectionService.open()
    conn = svc.get(name, owner=svc.settings.user)
    if json:
        return emit_json(conn.to_dict())
    _print(conn)


@app.command()
@handle_errors
def delete(name: str, json: bool = JSON) -> None:
    """Delete one of your connections."""
    svc = ConnectionService.open()
    svc.delete(name, owner=svc.settings.user)
    if json:
        return emit_json({"name": name, "deleted": True})
    out.print(f"deleted connection {name}", highlight=False)

"""``flowsession identity ...``: managed identities, the named credentials a session can run as
(package-feed secrets and connections), through the server (see ``cli/connect.py``)."""

from __future__ import annotations

import datetime as dt

import typer

from flowsession.cli.connect import client
from flowsession.cli.feeds import read_secret
from flowsession.cli.output import emit_json, fields, handle_errors, out, table

app = typer.Typer(no_args_is_help=True)
JSON = typer.Option(False, "--json", help="Print machine-readable JSON.")


def _dict(identity: dict) -> dict:
    d = dict(identity)
    d["created"] = (dt.datetime.fromtimestamp(d["created_at"]).strftime("%Y-%m-%d %H:%M:%S")
                    if d.get("created_at") else "")
    return d


def _row(identity: dict) -> dict:
    d = _dict(identity)
    d["connections"] = ", ".join(d["connections"])
    d["feed_hosts"] = ", ".join(d["feed_hosts"])
    return d


@app.command()
@handle_errors
def create(
    name: str,
    description: str = typer.Option("", "--description"),
    connection: list[str] = typer.Option([], "--connection", help="A connection it gives "
                                         "access to (repeatable)."),
    json: bool = JSON,
) -> None:
    """Create a managed identity. Using it needs identities:use:NAME."""
    with client() as c:
        identity = c.create_identity(name, description=description, connections=connection)
    if json:
        return emit_json(identity)
    out.print(f"created identity {identity['name']}", highlight=False)


@app.command("list")
@handle_errors
def list_(json: bool = JSON) -> None:
    """The managed identities: their connections, feed hosts, and whether you may use them."""
    with client() as c:
        rows = c.list_identities()
    if json:
        return emit_json(rows)
    table([_row(r) for r in rows], ["name", "connections", "feed_hosts", "usable",
                                    "description"])


@app.command()
@handle_errors
def show(name: str, json: bool = JSON) -> None:
    """One managed identity (its feed hosts, never their secrets)."""
    with client() as c:
        identity = c.get_identity(name)
    if json:
        return emit_json(identity)
    fields(_row(identity), ("name", "description", "connections", "feed_hosts", "usable",
                            "created_by", "created"))


@app.command()
@handle_errors
def delete(name: str, json: bool = JSON) -> None:
    """Delete a managed identity and its feed secrets (refused while a session uses it)."""
    with client() as c:
        result = c.delete_identity(name)
    if json:
        return emit_json(result)
    out.print(f"deleted identity {name}", highlight=False)


@app.command("set-feed")
@handle_errors
def set_feed(
    name: str = typer.Argument(..., help="The identity."),
    host: str = typer.Argument(..., help="The feed's host, as in https://{private}@HOST/..."),
    stdin: bool = typer.Option(False, "--stdin", help="Read the secret from standard input."),
) -> None:
    """Store the identity's secret for {private} feeds on HOST: read from a prompt or stdin,
    never from the command line."""
    secret = read_secret(stdin)
    with client() as c:
        c.set_feed_secret(host, secret, identity=name)
    out.print(f"stored the secret for {host} (identity {name})", highlight=False)


@app.command("delete-feed")
@handle_errors
def delete_feed(name: str, host: str) -> None:
    """Forget the identity's secret for HOST."""
    with client() as c:
        c.delete_feed_secret(host, identity=name)
    out.print(f"deleted the secret for {host} (identity {name})", highlight=False)


@app.command("set-connections")
@handle_errors
def set_connections(
    name: str = typer.Argument(..., help="The identity."),
    connections: list[str] = typer.Argument(None, help="The connections it gives access to "
                                            "(none: it gives access to none)."),
    json: bool = JSON,
) -> None:
    """Replace the connections the identity gives access to."""
    with client() as c:
        identity = c.set_identity_connections(name, connections or [])
    if json:
        return emit_json(identity)
    out.print(f"identity {name} gives access to: "
              f"{', '.join(identity['connections']) or 'no connection'}", highlight=False)

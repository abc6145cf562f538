"""``flowsession feed ...``: secrets for ``-i https://{private}@host/...`` lines, through the
server (see ``cli/connect.py``). A secret is read from a prompt or stdin, never the command
line, and is sent in a request body only."""

from __future__ import annotations

import sys

import typer

from flowsession.access import USER_IDENTITY
from flowsession.cli.connect import client
from flowsession.cli.output import emit_json, handle_errors, out, table

app = typer.Typer(no_args_is_help=True)
IDENTITY = typer.Option(USER_IDENTITY, help="The identity that holds the secret: 'user' (a "
                        "session's own identity) or a managed identity's name.")


def read_secret(stdin: bool) -> str:
    """The secret from standard input (one line) or a hidden prompt."""
    return (sys.stdin.readline().rstrip("\n") if stdin
            else typer.prompt("secret (user:token or token)", hide_input=True))


@app.command("set")
@handle_errors
def set_(
    host: str = typer.Argument(..., help="The feed's host, as in https://{private}@HOST/..."),
    stdin: bool = typer.Option(False, "--stdin", help="Read the secret from standard input."),
    identity: str = IDENTITY,
) -> None:
    """Store the secret ('user:token' or a token) that fills {private} for HOST.

    The secret is read from a prompt or stdin, never from the command line. On a server the
    'user' identity's secrets serve every user's own-identity builds: setting them needs
    identities:write."""
    secret = read_secret(stdin)
    with client() as c:
        c.set_feed_secret(host, secret, identity=identity)
    out.print(f"stored the secret for {host} (identity {identity})", highlight=False)


@app.command("list")
@handle_errors
def list_(identity: str = typer.Option(None, help="Only this identity."),
          json: bool = typer.Option(False, "--json")) -> None:
    """List feed secrets (masked)."""
    with client() as c:
        rows = c.list_feed_secrets(identity=identity)
    if json:
        return emit_json(rows)
    table(rows, ["identity", "host", "secret"])


@app.command()
@handle_errors
def delete(host: str, identity: str = IDENTITY) -> None:
    """Forget the secret for HOST."""
    with client() as c:
        c.delete_feed_secret(host, identity=identity)
    out.print(f"deleted the secret for {host}", highlight=False)

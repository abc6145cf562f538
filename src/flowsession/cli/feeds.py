"""``flowsession feed ...``: secrets for ``-i https://{private}@host/...`` lines."""

from __future__ import annotations

import sys

import typer

from flowsession.access.secrets import USER_IDENTITY, FeedSecrets
from flowsession.cli.output import emit_json, handle_errors, out, table
from flowsession.config import Settings
from flowsession.store import open_store

app = typer.Typer(no_args_is_help=True)
IDENTITY = typer.Option(USER_IDENTITY, help="The identity that holds the secret.")


def _secrets() -> FeedSecrets:
    settings = Settings.from_env()
    return FeedSecrets(settings, open_store(settings.db_url))


@app.command("set")
@handle_errors
def set_(
    host: str = typer.Argument(..., help="The feed's host, as in https://{private}@HOST/..."),
    stdin: bool = typer.Option(False, "--stdin", help="Read the secret from standard input."),
    identity: str = IDENTITY,
) -> None:
    """Store the secret ('user:token' or a token) that fills {private} for HOST.

    The secret is read from a prompt or stdin, never from the command line."""
    secret = (sys.stdin.readline().rstrip("\n") if stdin
              else typer.prompt("secret (user:token or token)", hide_input=True))
    _secrets().set(host, secret, identity=identity)
    out.print(f"stored the secret for {host} (identity {identity})", highlight=False)


@app.command("list")
@handle_errors
def list_(identity: str = typer.Option(None, help="Only this identity."),
          json: bool = typer.Option(False, "--json")) -> None:
    """List feed secrets (masked)."""
    rows = _secrets().list(identity=identity)
    if json:
        return emit_json(rows)
    table(rows, ["identity", "host", "secret"])


@app.command()
@handle_errors
def delete(host: str, identity: str = IDENTITY) -> None:
    """Forget the secret for HOST."""
    _secrets().delete(host, identity=identity)
    out.print(f"deleted the secret for {host}", highlight=False)

"""``flowsession audit``, ``user ...``, ``token ...``, ``role ...``: who may use the server and
what they did (server only; see ``cli/connect.py``)."""

from __future__ import annotations

import datetime as dt

import typer

from flowsession.cli.connect import client
from flowsession.cli.output import emit_json, err, handle_errors, out, table

users_app = typer.Typer(no_args_is_help=True)
tokens_app = typer.Typer(no_args_is_help=True)
roles_app = typer.Typer(no_args_is_help=True)
JSON = typer.Option(False, "--json", help="Print machine-readable JSON.")


def _when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else ""


# --- the audit log ---------------------------------------------------------------------------

@handle_errors
def audit(
    limit: int = typer.Option(50, "--limit", min=1, max=10000, help="How many entries "
                              "(newest first)."),
    actor: str = typer.Option(None, "--actor", help="Only what this user did."),
    json: bool = JSON,
) -> None:
    """The audit log: who did what to which resource, when, with what result.

    Every change and every refusal is in it, newest first. Needs audit:read."""
    with client() as c:
        rows = c.audit(limit=limit, actor=actor)
    if json:
        return emit_json(rows)
    table([{**r, "when": _when(r["at"])} for r in rows],
          ["when", "actor", "action", "resource", "status", "result"])


# --- users -----------------------------------------------------------------------------------

@users_app.command()
@handle_errors
def create(
    name: str = typer.Argument(..., help="The user's name."),
    role: list[str] = typer.Option([], "--role", help="A role to assign (repeatable), e.g. "
                                   "'Data Scientist', Reader, Owner."),
    display_name: str = typer.Option("", "--display-name"),
    json: bool = JSON,
) -> None:
    """Create a user and their first token (printed once: hand it to them; they set
    FLOWSESSION_TOKEN)."""
    with client() as c:
        user = c.create_user(name, roles=role, display_name=display_name)
    if json:
        return emit_json(user)
    roles = ", ".join(user["roles"]) or "no role"
    out.print(f"created user {user['name']} ({roles})", highlight=False)
    err.print("their token, shown this once:", highlight=False)
    out.print(user["token"], highlight=False, markup=False)


@users_app.command("list")
@handle_errors
def list_users(json: bool = JSON) -> None:
    """The server's users and their roles."""
    with client() as c:
        rows = c.list_users()
    if json:
        return emit_json(rows)
    table([{**r, "roles": ", ".join(r["roles"]), "created": _when(r["created_at"])}
           for r in rows], ["name", "display_name", "roles", "disabled", "created"])


@users_app.command()
@handle_errors
def disable(name: str, json: bool = JSON) -> None:
    """Disable a user: their tokens stop working at once (their sessions go on)."""
    with client() as c:
        result = c.disable_user(name)
    if json:
        return emit_json(result)
    out.print(f"disabled user {name}", highlight=False)


# --- tokens ----------------------------------------------------------------------------------

@tokens_app.command("create")
@handle_errors
def create_token(label: str = typer.Option("", "--label", help="What the token is for."),
                 json: bool = JSON) -> None:
    """A new token for yourself (printed once)."""
    with client() as c:
        token = c.create_token(label=label)
    if json:
        return emit_json(token)
    out.print(f"created token {token['id']}" + (f" ({label})" if label else ""),
              highlight=False)
    err.print("the token, shown this once:", highlight=False)
    out.print(token["token"], highlight=False, markup=False)


@tokens_app.command("list")
@handle_errors
def list_tokens(json: bool = JSON) -> None:
    """Your tokens (every user's with users:read): never their secrets."""
    with client() as c:
        rows = c.list_tokens()
    if json:
        return emit_json(rows)
    table([{**r, "created": _when(r["created_at"]), "last_used": _when(r["last_used_at"]),
            "revoked": _when(r["revoked_at"])} for r in rows],
          ["id", "user", "label", "created", "last_used", "revoked"])


@tokens_app.command()
@handle_errors
def revoke(token_id: str = typer.Argument(..., metavar="ID", help="The token's id "
                                          "(flowsession token list)."),
           json: bool = JSON) -> None:
    """Revoke a token: it stops working at once."""
    with client() as c:
        result = c.revoke_token(token_id)
    if json:
        return emit_json(result)
    out.print(f"revoked token {token_id}", highlight=False)


# --- roles -----------------------------------------------------------------------------------

@roles_app.command("list")
@handle_errors
def list_roles(json: bool = JSON) -> None:
    """The roles: built-in and custom, with their scopes."""
    with client() as c:
        rows = c.list_roles()
    if json:
        return emit_json(rows)
    table([{**r, "scopes": ", ".join(r["scopes"])} for r in rows],
          ["name", "builtin", "scopes", "description"])


@roles_app.command("create")
@handle_errors
def create_role(
    name: str,
    scope: list[str] = typer.Option(..., "--scope", help="A scope, e.g. audit:read or "
                                    "sessions:* (repeatable)."),
    description: str = typer.Option("", "--description"),
    json: bool = JSON,
) -> None:
    """A custom role: a name for a set of scopes."""
    with client() as c:
        role = c.create_role(name, scope, description=description)
    if json:
        return emit_json(role)
    out.print(f"created role {role['name']}: {', '.join(role['scopes'])}", highlight=False)


@roles_app.command("delete")
@handle_errors
def delete_role(name: str, json: bool = JSON) -> None:
    """Delete a custom role (and its assignments)."""
    with client() as c:
        result = c.delete_role(name)
    if json:
        return emit_json(result)
    out.print(f"deleted role {name}", highlight=False)


@roles_app.command()
@handle_errors
def assign(user: str, role: str, json: bool = JSON) -> None:
    """Give USER the role ROLE (applies to their next request)."""
    with client() as c:
        result = c.assign_role(user, role)
    if json:
        return emit_json(result)
    out.print(f"{user} has role {role}", highlight=False)


@roles_app.command()
@handle_errors
def unassign(user: str, role: str, json: bool = JSON) -> None:
    """Take the role ROLE from USER."""
    with client() as c:
        result = c.unassign_role(user, role)
    if json:
        return emit_json(result)
    out.print(f"{user} no longer has role {role}", highlight=False)

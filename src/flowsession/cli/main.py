"""``flowsession``: the console command."""

from __future__ import annotations

import logging

import typer

from flowsession import __version__
from flowsession.cli import (
    access,
    computes,
    connections,
    environments,
    feeds,
    identities,
    images,
    runs,
    server,
    sessions,
)

app = typer.Typer(
    name="flowsession",
    help="Self-hosted compute sessions for prompt flow. Commands speak to a flowsession "
         "server: FLOWSESSION_URL and FLOWSESSION_TOKEN, or else this home's local server, "
         "started for you when none runs (flowsession server status | stop).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(images.app, name="image", help="Images: named, versioned base environments.")
app.add_typer(environments.app, name="env", help="Environments: an image plus a flow's packages.")
app.add_typer(feeds.app, name="feed", help="Secrets for private package feeds ({private}).")
app.add_typer(sessions.app, name="session", help="Compute sessions: one flow's running "
              "environment.")
app.add_typer(computes.app, name="compute", help="Computes: serverless and instances.")
app.add_typer(connections.app, name="connection", help="prompt flow connections (OpenAI, "
              "Azure OpenAI, custom); secrets encrypted.")
app.add_typer(runs.app, name="run", help="Batch runs: a flow over data on its session.")
app.add_typer(server.app, name="server", help="Serve the REST API (and run the culler and "
              "the reconciler).")
app.add_typer(sessions.flow_app, name="flow", help="Flows: test a line on the flow's session.")
app.add_typer(identities.app, name="identity", help="Managed identities: feed secrets and "
              "connections a session can run as.")
app.add_typer(access.users_app, name="user", help="Users of the server (and their first "
              "token).")
app.add_typer(access.tokens_app, name="token", help="Your API tokens.")
app.add_typer(access.roles_app, name="role", help="Roles (sets of scopes) and who has them.")
app.command("audit")(access.audit)


@app.callback()
def _main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what happens to stderr."),
) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


@app.command()
def version() -> None:
    """Print flowsession's version."""
    typer.echo(__version__)


if __name__ == "__main__":
    app()

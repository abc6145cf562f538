"""``flowsession server``: the REST API (OpenAPI at /docs), the reconciler and the idle
culler, in one process."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer

from flowsession.cli.output import err, handle_errors, out

app = typer.Typer()


def client_config_path(settings) -> Path:
    """Where the CLI and the SDK find the server's URL and a token (mode 0600)."""
    return settings.home / "client.json"


@app.callback(invoke_without_command=True)
@handle_errors
def server(
    host: str = typer.Option("127.0.0.1", "--host", help="The address to listen on."),
    port: int = typer.Option(8765, "--port", help="The port to listen on."),
    register: list[Path] = typer.Option(None, "--register", help="Register this flow folder "
                                        "(by its folder name) for the administrator; "
                                        "repeatable."),
    log_level: str = typer.Option("info", "--log-level"),
) -> None:
    """Serve the API. On a new server the first user (you) becomes Owner; their token is
    printed once and kept in FLOWSESSION_HOME/client.json for the CLI and the SDK."""
    import uvicorn

    from flowsession.api.app import bootstrap_admin, create_app
    from flowsession.config import Settings
    from flowsession.errors import Conflict

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    settings = Settings.from_env()
    app_ = create_app(settings)
    svc = app_.state.services
    token = bootstrap_admin(svc, None)
    url = f"http://{host}:{port}"
    config = client_config_path(settings)
    if token is not None:
        config.parent.mkdir(parents=True, exist_ok=True)
        config.touch(mode=0o600)
        config.chmod(0o600)
        config.write_text(json.dumps({"url": url, "token": token, "user": settings.user}))
    for folder in register or []:
        name = folder.resolve().name
        try:
            svc.extra["flows"].register(name, owner=settings.user, path=str(folder.resolve()))
            err.print(f"registered flow {name} ({folder})", highlight=False)
        except Conflict:
            pass
    out.print(f"[bold]flowsession server[/] at {url}  (API docs: {url}/docs)", highlight=False)
    if token is not None:
        out.print(f"administrator [bold]{settings.user}[/] token (shown once; kept in "
                  f"{config}):\n  {token}", highlight=False)
    elif config.exists():
        out.print(f"the administrator's token is in {config}", highlight=False)
    uvicorn.run(app_, host=host, port=port, log_level=log_level)

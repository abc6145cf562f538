"""``flowsession env ...``: through the server (see ``cli/connect.py``), except ``env run``,
which runs a process of yours, here, in the flow's environment."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import typer

import flowsession
from flowsession.access import USER_IDENTITY
from flowsession.cli.connect import client
from flowsession.cli.output import emit_json, err, fields, handle_errors, out, progress, table
from flowsession.cli.pfargs import flow_ref
from flowsession.config import format_size

app = typer.Typer(no_args_is_help=True)
JSON = typer.Option(False, "--json", help="Print machine-readable JSON.")
IDENTITY = typer.Option(USER_IDENTITY, help="Whose feed secrets fill {private}.")


@app.command()
@handle_errors
def build(
    flow: str = typer.Argument(..., help="The flow folder, or a registered flow's name."),
    refresh: bool = typer.Option(False, help="Resolve the requirements again (newer versions)."),
    identity: str = IDENTITY,
    json: bool = JSON,
) -> None:
    """Build (or find) the flow's environment and print its env_id."""
    with client() as c, progress(f"preparing the environment of {flow} ...") as on_progress:
        env = c.build_environment(flow_ref(flow, c), refresh=refresh, identity=identity,
                                  on_progress=on_progress)
    if json:
        return emit_json(env)
    typer.echo(env["id"])


@app.command()
@handle_errors
def packages(flow: str = typer.Argument(..., help="The flow folder, or a registered flow's "
                                        "name."),
             identity: str = IDENTITY, json: bool = JSON) -> None:
    """List the packages of the flow's environment: name, version, origin."""
    with client() as c:
        with progress(f"preparing the environment of {flow} ...") as on_progress:
            env = c.build_environment(flow_ref(flow, c), identity=identity,
                                      on_progress=on_progress)
        pkgs = c.environment_packages(env["id"])
    if json:
        return emit_json(pkgs)
    table(pkgs, ["name", "version", "origin"], title=f"environment {env['id']}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@handle_errors
def run(
    ctx: typer.Context,
    flow: Path = typer.Argument(..., help="The flow folder."),
    identity: str = IDENTITY,
) -> None:
    """Run a command in the flow's environment, in its snapshot: env run FLOW -- CMD ARGS...

    The command is a process of yours, run here (not a server operation): the environment is
    prepared in this process, in FLOWSESSION_HOME, as the server would build it.

    Example: flowsession env run FLOW -- python -m flowsession.worker.testline --inputs k=v"""
    if not ctx.args:
        raise typer.BadParameter("give the command to run after --")
    from flowsession.environments.service import EnvironmentService  # a local command only

    svc = EnvironmentService.open()
    with err.status(f"preparing the environment of {flow} ..."):
        prepared = asyncio.run(svc.prepare(flow, identity=identity))
        env = asyncio.run(svc.ensure(prepared, identity=identity))
    command = list(ctx.args)
    bin_dir = Path(env.path) / "bin"
    if (bin_dir / command[0]).exists():
        command[0] = str(bin_dir / command[0])
    worker_root = str(Path(flowsession.__file__).parent.parent)
    environ = {**os.environ, "VIRTUAL_ENV": env.path, "PATH": f"{bin_dir}:{os.environ['PATH']}",
               "PYTHONPATH": worker_root}
    code = subprocess.call(command, cwd=prepared.snapshot.path, env=environ)
    raise typer.Exit(code)


@app.command("list")
@handle_errors
def list_(json: bool = JSON) -> None:
    """List environments, most recently used first."""
    with client() as c:
        envs = c.list_environments()
    if json:
        return emit_json(envs)
    table([{**e, "size": format_size(e.get("size_bytes") or 0)} for e in envs],
          ["id", "image", "state", "packages", "refs", "size"])


@app.command()
@handle_errors
def show(env_id: str, json: bool = JSON) -> None:
    """Show one environment."""
    with client() as c:
        data = c.get_environment(env_id)
    if json:
        return emit_json(data)
    fields(data, ("id", "image", "state", "path", "size_bytes", "refs", "log", "error"))
    out.print(data.get("lock") or "(no packages beyond the image)", highlight=False)


@app.command()
@handle_errors
def remove(env_id: str) -> None:
    """Delete an environment no session uses."""
    with client() as c:
        c.remove_environment(env_id)
    out.print(f"removed {env_id}")

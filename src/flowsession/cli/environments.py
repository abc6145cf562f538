"""``flowsession env ...``"""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import typer

import flowsession

from flowsession.access.secrets import USER_IDENTITY
from flowsession.cli.output import emit_json, err, fields, handle_errors, out, table
from flowsession.config import format_size
from flowsession.environments.service import EnvironmentService

app = typer.Typer(no_args_is_help=True)
JSON = typer.Option(False, "--json", help="Print machine-readable JSON.")
IDENTITY = typer.Option(USER_IDENTITY, help="Whose feed secrets fill {private}.")


@app.command()
@handle_errors
def build(
    flow: Path = typer.Argument(..., help="The flow folder."),
    refresh: bool = typer.Option(False, help="Resolve the requirements again (newer versions)."),
    identity: str = IDENTITY,
    json: bool = JSON,
) -> None:
    """Build (or find) the flow's environment and print its env_id."""
    svc = EnvironmentService.open()
    with err.status(f"preparing the environment of {flow} ..."):
        env = asyncio.run(svc.ensure_for_flow(flow, identity=identity, refresh=refresh))
    if json:
        return emit_json(env.to_dict())
    typer.echo(env.id)


@app.command()
@handle_errors
def packages(flow: Path = typer.Argument(..., help="The flow folder."),
             identity: str = IDENTITY, json: bool = JSON) -> None:
    """List the packages of the flow's environment: name, version, origin."""
    svc = EnvironmentService.open()
    with err.status(f"preparing the environment of {flow} ..."):
        env = asyncio.run(svc.ensure_for_flow(flow, identity=identity))
    pkgs = [p.__dict__ for p in svc.packages(env)]
    if json:
        return emit_json(pkgs)
    table(pkgs, ["name", "version", "origin"], title=f"environment {env.id}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@handle_errors
def run(
    ctx: typer.Context,
    flow: Path = typer.Argument(..., help="The flow folder."),
    identity: str = IDENTITY,
) -> None:
    """Run a command in the flow's environment, in its snapshot: env run FLOW -- CMD ARGS...

    Example: flowsession env run FLOW -- python -m flowsession.worker.testline --inputs k=v"""
    if not ctx.args:
        raise typer.BadParameter("give the command to run after --")
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
    envs = EnvironmentService.open().cache.list()
    if json:
        return emit_json([e.to_dict() for e in envs])
    table([{**e.to_dict(), "size": format_size(e.size_bytes or 0)} for e in envs],
          ["id", "image", "state", "packages", "refs", "size"])


@app.command()
@handle_errors
def show(env_id: str, json: bool = JSON) -> None:
    """Show one environment."""
    svc = EnvironmentService.open()
    env = svc.cache.get(env_id)
    data = {**env.to_dict(), "log": str(svc.cache.log_path(env_id)),
            "holders": svc.cache.holders(env_id)}
    if json:
        return emit_json(data)
    fields(data, ("id", "image", "state", "path", "size_bytes", "refs", "log", "error"))
    out.print(env.lock or "(no packages beyond the image)", highlight=False)


@app.command()
@handle_errors
def remove(env_id: str) -> None:
    """Delete an environment no session uses."""
    EnvironmentService.open().cache.remove(env_id)
    out.print(f"removed {env_id}")

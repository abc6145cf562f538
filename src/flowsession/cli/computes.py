"""``flowsession compute ...``"""

from __future__ import annotations

import asyncio

import typer

from flowsession.cli.output import emit_json, fields, handle_errors, out, table
from flowsession.config import format_duration, format_size, parse_duration
from flowsession.sessions.service import SessionService

app = typer.Typer(no_args_is_help=True)
JSON = typer.Option(False, "--json", help="Print machine-readable JSON.")


def _row(compute) -> dict:
    d = compute.to_dict()
    d["memory"] = format_size(compute.memory_bytes)
    d["idle_shutdown"] = format_duration(compute.idle_shutdown_s or 0)
    return d


@app.command()
@handle_errors
def sizes(json: bool = JSON) -> None:
    """The VM sizes, and how much of the vCPU quota is free."""
    svc = SessionService.open()
    rows = [{"name": s.name, "vcpu": s.vcpu, "memory_bytes": s.memory_bytes,
             "memory": format_size(s.memory_bytes), "description": s.description}
            for s in svc.computes.catalog.values()]
    in_use, quota = svc.computes.vcpu_in_use(), svc.settings.vcpu_quota
    if json:
        return emit_json({"sizes": rows, "vcpu_quota": quota, "vcpu_in_use": in_use})
    table(rows, ["name", "vcpu", "memory", "description"],
          title=f"vCPU quota: {in_use:g} of {quota:g} in use")


@app.command()
@handle_errors
def create(
    name: str,
    size: str = typer.Option(None, "--size", help="The VM size (default: one that fits)."),
    idle_shutdown: str = typer.Option(None, "--idle-shutdown", help="Stop (not delete) the "
                                      "instance after this long without sessions, e.g. 2h."),
    json: bool = JSON,
) -> None:
    """Create a compute instance (yours alone; fixed size)."""
    svc = SessionService.open()
    compute = asyncio.run(svc.computes.create_instance(
        name, user=svc.settings.user, size=size,
        idle_shutdown_s=parse_duration(idle_shutdown, name="--idle-shutdown")
        if idle_shutdown else None))
    if json:
        return emit_json(_row(compute))
    out.print(f"compute instance {compute.name} is {compute.state} ({compute.vm_size})",
              highlight=False)


@app.command()
@handle_errors
def start(name: str, json: bool = JSON) -> None:
    """Start a stopped compute instance."""
    svc = SessionService.open()
    compute = asyncio.run(svc.computes.start(name, user=svc.settings.user))
    if json:
        return emit_json(_row(compute))
    out.print(f"compute instance {compute.name} is {compute.state}", highlight=False)


@app.command()
@handle_errors
def stop(name: str, json: bool = JSON) -> None:
    """Stop a compute instance; the sessions on it stop."""
    svc = SessionService.open()
    user = svc.settings.user
    compute = asyncio.run(svc.stop_compute(svc.computes.get(name, user=user), actor=user,
                                           reason=f"stopped by {user}"))
    if json:
        return emit_json(_row(compute))
    out.print(f"compute instance {compute.name} is {compute.state}", highlight=False)


@app.command()
@handle_errors
def delete(name: str) -> None:
    """Delete a compute instance that hosts no session."""
    svc = SessionService.open()
    asyncio.run(svc.computes.delete(name, user=svc.settings.user))
    out.print(f"deleted compute {name}", highlight=False)


@app.command("list")
@handle_errors
def list_(json: bool = JSON) -> None:
    """List your computes."""
    svc = SessionService.open()
    asyncio.run(svc.sweeper.sweep())
    rows = [_row(c) for c in svc.computes.list(user=svc.settings.user)]
    if json:
        return emit_json(rows)
    table(rows, ["name", "kind", "state", "vm_size", "vcpu", "memory", "idle_shutdown", "limits"])


@app.command()
@handle_errors
def show(name: str, json: bool = JSON) -> None:
    """Show one compute."""
    svc = SessionService.open()
    compute = svc.computes.get(name, user=svc.settings.user)
    data = {**_row(compute), "sessions": svc.computes.session_count(compute.id)}
    if json:
        return emit_json(data)
    fields(data, ("name", "id", "kind", "state", "vm_size", "vcpu", "memory", "idle_shutdown",
                  "limits", "sessions", "owner", "reason"))

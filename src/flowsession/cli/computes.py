"""``flowsession compute ...``: through the server (see ``cli/connect.py``)."""

from __future__ import annotations

import typer

from flowsession.cli.connect import client
from flowsession.cli.output import emit_json, err, fields, handle_errors, out, table
from flowsession.config import format_duration, format_size, parse_duration

app = typer.Typer(no_args_is_help=True)
JSON = typer.Option(False, "--json", help="Print machine-readable JSON.")


# what list and show both say of a compute, in one order
_COLUMNS = ("kind", "state", "vm_size", "vcpu", "memory", "sessions", "idle_shutdown", "limits")


def _row(compute: dict) -> dict:
    d = dict(compute)
    d["memory"] = format_size(d.get("memory_bytes") or 0)
    if "idle_shutdown_s" in d:
        d["idle_shutdown"] = format_duration(d["idle_shutdown_s"] or 0)
    return d


@app.command()
@handle_errors
def sizes(json: bool = JSON) -> None:
    """The VM sizes, and how much of the vCPU quota is free."""
    with client() as c:
        answer = c.compute_sizes()
    rows = [{**s, "memory": format_size(s["memory_bytes"])} for s in answer["sizes"]]
    in_use, quota = answer["vcpu_in_use"], answer["vcpu_quota"]
    if json:
        return emit_json({"sizes": rows, "vcpu_quota": quota, "vcpu_in_use": in_use,
                          "vcpu_quota_source": answer.get("vcpu_quota_source"),
                          "implicit_size": answer.get("implicit_size")})
    table(rows, ["name", "vcpu", "memory", "description"],
          title=f"vCPU quota: {in_use:g} of {quota:g} in use")
    if answer.get("vcpu_quota_source"):
        err.print(f"the quota: {answer['vcpu_quota_source']}", highlight=False)
    if answer.get("implicit_size"):
        err.print(f"sessions started by flow test or run create take {answer['implicit_size']}"
                  "; over the quota, your least recently used idle serverless sessions are "
                  "stopped to make room", highlight=False)


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
    if idle_shutdown:
        parse_duration(idle_shutdown, name="--idle-shutdown")  # a bad value: named here
    with client() as c:
        compute = _row(c.create_compute(name, size=size, idle_shutdown=idle_shutdown))
    if json:
        return emit_json(compute)
    out.print(f"compute instance {compute['name']} is {compute['state']} "
              f"({compute['vm_size']})", highlight=False)


@app.command()
@handle_errors
def start(name: str, json: bool = JSON) -> None:
    """Start a stopped compute instance."""
    with client() as c:
        compute = _row(c.start_compute(name))
    if json:
        return emit_json(compute)
    out.print(f"compute instance {compute['name']} is {compute['state']}", highlight=False)


@app.command()
@handle_errors
def stop(name: str, json: bool = JSON) -> None:
    """Stop a compute instance; the sessions on it stop."""
    with client() as c:
        compute = _row(c.stop_compute(name))
    if json:
        return emit_json(compute)
    out.print(f"compute instance {compute['name']} is {compute['state']}", highlight=False)


@app.command()
@handle_errors
def delete(name: str) -> None:
    """Delete a compute instance that hosts no session."""
    with client() as c:
        c.delete_compute(name)
    out.print(f"deleted compute {name}", highlight=False)


@app.command("list")
@handle_errors
def list_(json: bool = JSON) -> None:
    """List your computes (every user's, if you manage everything)."""
    with client() as c:
        rows = [_row(x) for x in c.list_computes()]
    if json:
        return emit_json(rows)
    owners = ["owner"] if len({r.get("owner") for r in rows}) > 1 else []  # an Owner sees all
    ids = ["id"] if any(r["id"] != r["name"] for r in rows) else []  # instances' own names
    table(rows, ["name", *ids, *owners, *_COLUMNS])


@app.command()
@handle_errors
def show(name: str, json: bool = JSON) -> None:
    """Show one compute."""
    with client() as c:
        data = _row(c.get_compute(name))
    if json:
        return emit_json(data)
    fields(data, ("name", "id", "owner", *_COLUMNS, "reason"))

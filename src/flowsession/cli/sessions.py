"""``flowsession session ...`` and ``flowsession flow test``: through the server (the local one
unless FLOWSESSION_URL says otherwise; see ``cli/connect.py``).

A session is named by its flow (a folder) or by its id: an argument that looks like a session
id (``ses-`` and ten hex digits) and is neither a folder here nor a registered flow's name is
the session's id, so a session whose flow folder was deleted or moved can still be shown,
stopped and read."""

from __future__ import annotations

import datetime as dt
import json as jsonlib
import sys
from pathlib import Path

import typer

from flowsession.cli.connect import client
from flowsession.cli.output import emit_json, err, fields, handle_errors, out, progress, table
from flowsession.cli.pfargs import PfCommand, flow_ref
from flowsession.config import format_duration, parse_duration
from flowsession.errors import Forbidden, NotFound
from flowsession.sessions.model import looks_like_session_id

app = typer.Typer(no_args_is_help=True)
flow_app = typer.Typer(no_args_is_help=True)
JSON = typer.Option(False, "--json", help="Print machine-readable JSON.")
FLOW = typer.Argument(..., help="The flow folder, or a registered flow's name (OWNER:NAME "
                      "for another's, if you manage everything).")
TARGET = typer.Argument(..., metavar="FLOW|SESSION_ID",
                        help="The flow folder, a registered flow's name, or the session's id "
                             "(ses-...).")


def _when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else ""


def _target(c, arg: str) -> tuple[str | None, Path | str | None]:
    """``(session_id, None)`` when ``arg`` names a session by its id: it looks like one and is
    neither a folder here nor a registered flow's name. Otherwise ``(None, flow)``: the folder
    (as before), or the flow of that name."""
    if not looks_like_session_id(arg) or Path(arg).exists():
        return None, flow_ref(arg, c)
    try:
        c.get_flow(arg)
    except (NotFound, Forbidden):
        return arg, None
    return None, arg


def _session_id(c, arg: str) -> str:
    session_id, flow = _target(c, arg)
    return session_id or c.get_session(flow).id


def _print_session(data: dict) -> None:
    if data.get("flow_missing"):
        data = {**data, "flow": f"{data['flow']} (the folder is missing: the session can be "
                                "shown and stopped, not reset)"}
    keys = ["id", "flow", "state", "reason", "compute_type", "compute_id", "vm_size", "image",
            "identity", "idle_time", "env_id", "sandbox", "limits", "owner", "created",
            "last_activity"]
    fields(data, keys)


def _session_dict(session) -> dict:
    d = session.to_dict()
    d["idle_time"] = format_duration(session.idle_timeout_s)
    d["created"] = _when(session.created_at)
    d["last_activity"] = _when(session.last_activity_at)
    return d


@app.command()
@handle_errors
def start(
    flow: str = FLOW,
    compute_type: str = typer.Option(None, "--compute-type", help="serverless (default) or "
                                     "instance."),
    vm_size: str = typer.Option(None, "--vm-size", help="Serverless: the VM size "
                                "(flowsession compute sizes)."),
    instance: str = typer.Option(None, "--instance", help="Instance: the compute instance."),
    idle_time: str = typer.Option(None, "--idle-time", help="Delete the session after this "
                                  "long unused, e.g. 30m, 2h (a bare number is minutes)."),
    identity: str = typer.Option(None, "--identity", help="Serverless: the identity to use."),
    image: str = typer.Option(None, "--image", help="Serverless: the image (default: the "
                              "flow's environment.image)."),
    json: bool = JSON,
) -> None:
    """Start the flow's session (default settings, or the advanced ones given)."""
    idle = parse_duration(idle_time, name="--idle-time") if idle_time else None
    with client() as c, progress(f"starting the session of {flow} ...") as on_progress:
        session = c.start_session(flow_ref(flow, c), on_progress=on_progress,
                                  compute_type=compute_type,
                                  vm_size=vm_size, instance=instance, idle_timeout_s=idle,
                                  identity=identity, image=image)
    if json:
        return emit_json(_session_dict(session))
    _print_session(_session_dict(session))


@app.command()
@handle_errors
def show(target: str = TARGET, json: bool = JSON) -> None:
    """Show the flow's session, or the session of that id."""
    with client() as c:
        session_id, flow = _target(c, target)
        session = c.get_session_by_id(session_id) if session_id else c.get_session(flow)
    if json:
        return emit_json(_session_dict(session))
    _print_session(_session_dict(session))


@app.command("list")
@handle_errors
def list_(all_: bool = typer.Option(False, "--all", help="Include stopped sessions."),
          json: bool = JSON) -> None:
    """List your sessions (every user's, if you manage everything)."""
    with client() as c:
        rows = [_session_dict(s) for s in c.list_sessions(all=all_)]
    if json:
        return emit_json(rows)
    owners = ["owner"] if len({r["owner"] for r in rows}) > 1 else []  # an Owner sees all
    table(rows, ["id", *owners, "state", "flow", "vm_size", "compute_id", "idle_time",
                 "last_activity"])


@app.command()
@handle_errors
def events(target: str = TARGET, json: bool = JSON) -> None:
    """The state changes of the flow's sessions (or of the session of that id): who, when,
    why."""
    with client() as c:
        session_id, flow = _target(c, target)
        found = c.session_events_by_id(session_id) if session_id else c.session_events(flow)
        rows = [{**e, "when": _when(e["at"])} for e in found]
    if json:
        return emit_json(rows)
    several = len({r["session_id"] for r in rows}) > 1  # the flow's earlier sessions too
    table(rows, ["when", *(["session_id"] if several else []), "to_state", "actor", "reason"])


@app.command()
@handle_errors
def install(target: str = TARGET, json: bool = JSON) -> None:
    """Save and install: install what the requirements file now says. Atomic: on failure the
    session keeps running unchanged."""
    with client() as c, progress("installing (the session keeps running meanwhile) ...") as p:
        session_id, flow = _target(c, target)
        session = (c.install_by_id(session_id, on_progress=p) if session_id
                   else c.install(flow, on_progress=p))
    if json:
        return emit_json(_session_dict(session))
    if (session.reason or "").startswith("nothing to install"):
        out.print(f"{session.reason} (session {session.id})", highlight=False)
        return
    out.print(f"installed: session {session.id} runs environment {session.env_id}",
              highlight=False)
    _, _, provided = (session.reason or "").partition(": the image ")
    if provided:
        out.print(f"the image {provided}", highlight=False)


@app.command()
@handle_errors
def packages(target: str = TARGET, json: bool = JSON) -> None:
    """View installed packages: name, version, origin (image or requirements)."""
    with client() as c:
        session_id, flow = _target(c, target)
        rows = (c.session_packages_by_id(session_id) if session_id
                else c.session_packages(flow))
    if json:
        return emit_json(rows)
    table(rows, ["name", "version", "origin"])


@app.command()
@handle_errors
def reset(target: str = TARGET, json: bool = JSON) -> None:
    """Delete and recreate the session with the same settings (picks up a changed image or
    requirements file). Needs the flow's folder."""
    with client() as c, progress("resetting ...") as on_progress:
        session_id, flow = _target(c, target)
        session = (c.reset_session_by_id(session_id, on_progress=on_progress) if session_id
                   else c.reset_session(flow, on_progress=on_progress))
    if json:
        return emit_json(_session_dict(session))
    _print_session(_session_dict(session))


@app.command()
@handle_errors
def stop(target: str = TARGET, json: bool = JSON) -> None:
    """Delete the session (a serverless compute with no session left is deleted); by id,
    whatever became of the flow's folder."""
    with client() as c:
        session_id, flow = _target(c, target)
        session = c.stop_session_by_id(session_id) if session_id else c.stop_session(flow)
    if json:
        return emit_json(_session_dict(session))
    out.print(f"stopped session {session.id}", highlight=False)


@app.command()
@handle_errors
def update(
    target: str = TARGET,
    vm_size: str = typer.Option(None, "--vm-size", help="A new VM size (resets the session)."),
    idle_time: str = typer.Option(None, "--idle-time", help="A new idle time (in place)."),
    identity: str = typer.Option(None, "--identity", help="A new identity (in place)."),
    instance: str = typer.Option(None, "--instance", help="Move to this instance (resets)."),
    json: bool = JSON,
) -> None:
    """Change the session's settings."""
    if idle_time:
        parse_duration(idle_time, name="--idle-time")  # a bad value: said here, as --idle-time
    changes = {"vm_size": vm_size, "identity": identity, "instance": instance,
               "idle_time": idle_time}
    with client() as c, err.status("updating ..."):
        session_id, flow = _target(c, target)
        session = (c.update_session_by_id(session_id, **changes) if session_id
                   else c.update_session(flow, **changes))
    if json:
        return emit_json(_session_dict(session))
    _print_session(_session_dict(session))


@app.command()
@handle_errors
def logs(target: str = TARGET,
         tail_bytes: int = typer.Option(64 * 1024, "--tail-bytes", min=1, max=1024 * 1024,
                                        help="Show at most this much of the log's end."),
         json: bool = JSON) -> None:
    """The session's supervisor and worker log (its end)."""
    with client() as c:
        session_id = _session_id(c, target)
        text = c.session_logs(session_id, tail_bytes=tail_bytes)
    if json:
        return emit_json({"session_id": session_id, "text": text})
    sys.stdout.write(text if not text or text.endswith("\n") else text + "\n")


def _inputs(pairs: list[str]) -> dict:
    values = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"'{pair}' is not key=value", param_hint="--inputs")
        try:
            values[key] = jsonlib.loads(value)
        except ValueError:
            values[key] = value
    return values


@flow_app.command("test", cls=PfCommand)
@handle_errors
def flow_test(
    flow: str = typer.Argument(None, help="The flow folder, or a registered flow's name "
                               "(OWNER:NAME for another's, if you manage everything)."),
    flow_option: str = typer.Option(None, "--flow", help="The flow, as pf takes it (instead "
                                    "of the argument)."),
    inputs: list[str] = typer.Option([], "--inputs", help="key=value (several after one "
                                     "--inputs, as pf takes them, or --inputs repeated)."),
    timeout: float = typer.Option(600, help="Seconds the line may take."),
    init: list[str] = typer.Option([], "--init", help="key=value for a flex flow class's "
                                   "__init__ (several, or repeat)."),
    json: bool = typer.Option(False, "--json", help="Print the outputs as JSON (they always "
                              "are: accepted as pf's scripts give it)."),
) -> None:
    """Run one line on the flow's session (started if none runs); print the outputs as JSON."""
    if flow and flow_option and flow != flow_option:
        raise typer.BadParameter(f"two flows given: {flow} and --flow {flow_option}",
                                 param_hint="FLOW")
    flow = flow or flow_option
    if not flow:
        raise typer.BadParameter("give the flow: a folder or a registered flow's name",
                                 param_hint="FLOW")
    values = _inputs(inputs)
    with client() as c, err.status(f"testing {flow} ..."):
        output = c.test(flow_ref(flow, c), values, timeout=timeout, init=_inputs(init))
    emit_json(output)

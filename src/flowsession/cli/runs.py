"""``flowsession run ...``: batch runs (prompt flow's ``pf run`` words)."""

from __future__ import annotations

import datetime as dt
import json as jsonlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from flowsession.cli.connect import client
from flowsession.cli.output import emit_json, err, fields, handle_errors, out, piped, table
from flowsession.cli.pfargs import PfCommand, flow_ref
from flowsession.client import Client
from flowsession.errors import InvalidInput
from flowsession.runs.model import ENDED, LineStatus, Run, RunStatus

if TYPE_CHECKING:
    from flowsession.runs.spec import RunSpec

app = typer.Typer(no_args_is_help=True)
JSON = typer.Option(False, "--json", help="Print machine-readable JSON.")
NAME = typer.Argument(..., help="The run's name.")


def _when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else ""


def _run_dict(run: Run) -> dict[str, Any]:
    d = run.to_dict()
    d["created"] = _when(run.created_at)
    d["started"] = _when(run.started_at)
    d["ended"] = _when(run.ended_at)
    d["duration"] = f"{run.duration:.2f} s" if run.duration is not None else ""
    return d


def _print_run(run: Run, c: Client) -> None:
    d = _run_dict(run)
    spec = run.spec
    d["data"] = spec.get("data")
    d["base_run"] = spec.get("run")
    d["variant"] = spec.get("variant")
    d["column_mapping"] = jsonlib.dumps(spec.get("column_mapping")) if spec.get(
        "column_mapping") else ""
    d["output_path"] = c.run_path(run.name)
    fields(d, ["name", "display_name", "status", "summary", "flow", "data", "base_run",
               "variant", "column_mapping", "session_id", "error", "created", "started",
               "ended", "duration", "output_path"])
    metrics = run.system_metrics or {}
    if metrics.get("total_tokens"):
        out.print(f"[bold]tokens:[/] {metrics.get('total_tokens', 0)} "
                  f"(prompt {metrics.get('prompt_tokens', 0)}, completion "
                  f"{metrics.get('completion_tokens', 0)})", highlight=False)
    throttle = run.throttle or {}
    if throttle.get("throttled"):
        out.print(f"[bold yellow]throttled:[/] the endpoint answered 429 (rate limited) "
                  f"{throttle['throttled']} time(s), last at {_when(throttle.get('at'))}; "
                  f"lines in flight lowered to {throttle.get('in_flight_limit')} of "
                  f"{throttle.get('concurrency')}", highlight=False)
    if run.errors:
        out.print("[bold]first errors:[/]", highlight=False)
        for line, message in run.errors:
            out.print(f"  line {line}: {message}", highlight=False, markup=False)


def _show(c: Client, run: Run, *, json: bool) -> None:
    """A run as JSON, or as the fields a person reads."""
    if json:
        emit_json(_run_dict(run))
    else:
        _print_run(run, c)


def _spec(file: Path | None, values: dict[str, Any]) -> RunSpec:
    """run.yml first, then the flags given on top."""
    from flowsession.runs.spec import load_run_yaml, spec_from_dict  # pydantic: run create only

    warnings: list[str] = []
    if file is not None:
        base, warnings = load_run_yaml(file)
        data = base.model_dump(exclude_unset=True)
    else:
        data = {}
    for key, value in values.items():
        if value is None or value is False or value in ({}, []):  # (0 is a value)
            continue
        if key in ("column_mapping", "environment_variables", "tags", "init",
                   "resources") and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    for w in warnings:
        err.print(f"[yellow]warning:[/] {w}", highlight=False)
    spec, more = spec_from_dict(data, source="the run")
    for w in more:
        err.print(f"[yellow]warning:[/] {w}", highlight=False)
    return spec


def _literal(value: str) -> Any:
    """``--init k=5`` gives 5; strings stay strings."""
    try:
        return jsonlib.loads(value)
    except ValueError:
        return value


@app.command(cls=PfCommand)
@handle_errors
def create(
    file: Path = typer.Option(None, "--file", "-f", help="A run.yml (prompt flow's Run schema)."),
    flow: str = typer.Option(None, "--flow", help="The flow folder, or a registered flow's "
                             "name (OWNER:NAME for another's, if you manage everything)."),
    data: str = typer.Option(None, "--data", help="The data: .jsonl, .json, .csv, .tsv or a "
                             "folder of them."),
    column_mapping: list[str] = typer.Option(None, "--column-mapping", help="input='${data.col}'"
                                             ", '${run.outputs.col}', '${run.inputs.col}' or a "
                                             "literal; several after one flag, or repeat."),
    run: str = typer.Option(None, "--run", help="A completed base run (for ${run.outputs.x})."),
    variant: str = typer.Option(None, "--variant", help="'${node.variant_id}'"),
    environment_variables: list[str] = typer.Option(None, "--environment-variables",
                                                    help="KEY=VALUE for the run; repeatable."),
    connections: list[str] = typer.Option(None, "--connections", help="node.connection=NAME "
                                           "(or node.deployment_name=...); repeatable."),
    init: list[str] = typer.Option(None, "--init", help="KEY=VALUE for a flex flow class's "
                                   "__init__; repeatable."),
    name: str = typer.Option(None, "--name", help="The run's name (default: generated)."),
    display_name: str = typer.Option(None, "--display-name"),
    description: str = typer.Option(None, "--description"),
    tags: list[str] = typer.Option(None, "--tags", help="KEY=VALUE; repeatable."),
    instance_type: str = typer.Option(None, "--instance-type", help="resources.instance_type: "
                                      "the serverless VM size if the session must start."),
    compute: str = typer.Option(None, "--compute", help="resources.compute: a compute "
                                "instance for the session if it must start."),
    identity: str = typer.Option(None, "--identity", help="The identity of a session started "
                                 "for the run."),
    workers: int = typer.Option(None, "--workers", help="Workers (default: the VM size's "
                                "vCPUs)."),
    line_timeout: float = typer.Option(None, "--line-timeout", help="Seconds a line may run "
                                       "(default 600; 0: no limit)."),
    max_concurrency: int = typer.Option(None, "--max-concurrency", help="Lines in flight "
                                        "(default 64, or PF_WORKER_COUNT; lowered while the "
                                        "endpoint answers 429)."),
    skip_malformed: bool = typer.Option(False, "--skip-malformed", help="Skip malformed data "
                                        "lines (they are reported) instead of refusing."),
    resume_from: str = typer.Option(None, "--resume-from", help="Run again only the lines "
                                    "that failed (or never ran) in this run."),
    stream: bool = typer.Option(False, "--stream", help="Show progress until the run ends; "
                                "exit 1 if it ends Failed or Canceled (0 if Completed)."),
    detach: bool = typer.Option(False, "--detach", help="Return once the run is submitted."),
    json: bool = JSON,
) -> None:
    """Create a run: a flow over data (and/or a base run's results) on the flow's session."""
    from flowsession.runs.mapping import parse_mapping_args
    from flowsession.runs.spec import connection_overrides, parse_pairs

    resources = {}
    if instance_type:
        resources["instance_type"] = instance_type
    if compute:
        resources["compute"] = compute
    values = {
        "flow": flow, "data": data, "run": run, "variant": variant, "name": name,
        "display_name": display_name, "description": description, "identity": identity,
        "workers": workers, "line_timeout": line_timeout, "skip_malformed": skip_malformed,
        "max_concurrency": max_concurrency,
        "resume_from": resume_from, "resources": resources,
        "column_mapping": parse_mapping_args(column_mapping or []),
        "environment_variables": parse_pairs(environment_variables,
                                             option="--environment-variables"),
        "connections": connection_overrides(parse_pairs(connections, option="--connections")),
        "init": {k: _literal(v) for k, v in parse_pairs(init, option="--init").items()},
        "tags": parse_pairs(tags, option="--tags"),
    }
    if flow and isinstance(flow_ref(flow), Path):  # else a registered flow's name
        values["flow"] = str(Path(flow).expanduser().resolve())
    if data:  # relative to where the command runs
        values["data"] = str(Path(data).expanduser().resolve())
    if file is None and not flow and not resume_from:
        raise InvalidInput("a run needs a flow", hint="give --flow FOLDER, or --file run.yml")
    spec = _spec(file, values)
    with client() as c:
        if spec.flow and not Path(spec.flow).exists():
            flow_ref(spec.flow, c)  # a name the server does not know: said as such
        with err.status("preparing the run ..."):
            run_ = c.submit(spec, wait=False)
        if not detach:
            run_ = _follow(c, run_, bar=stream)
        _show(c, run_, json=json)
    if run_.status not in ENDED and not json:
        err.print(f"[dim]the run goes on in its session: flowsession run show {run_.name}[/]",
                  highlight=False)
    if stream and not detach:
        _exit_as_ended(run_)


def _follow(c: Client, run: Run, *, bar: bool) -> Run:
    """Wait for the run to end; with ``bar``, a progress bar (lines/s, ETA). Ctrl-C stops
    waiting, not the run."""
    try:
        if not bar:
            with err.status(f"running {run.name} ({run.total} lines) ..."):
                return c.stream(run.name)
        progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                            MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                            TextColumn("{task.fields[failed]}"), TimeElapsedColumn(),
                            TextColumn("ETA"), TimeRemainingColumn(), console=err)
        with progress:
            task = progress.add_task(run.name, total=run.total or None, rate="", failed="")

            def show(r: Run) -> None:
                done = r.completed + r.failed
                rate = done / r.duration if r.duration else 0.0
                progress.update(task, completed=done, total=r.total or None,
                                rate=f"{rate:,.0f} lines/s",
                                failed=f"[red]{r.failed} failed[/]" if r.failed else "")

            final = c.stream(run.name, on_progress=show)
            show(final)  # the bar ends where the run ended, before the summary prints
            progress.refresh()
            return final
    except KeyboardInterrupt:
        err.print(f"stopped waiting; the run goes on: flowsession run show {run.name} "
                  f"(or run cancel {run.name})", highlight=False)
        return c.get_run(run.name)


@app.command()
@handle_errors
def stream(name: str = NAME, json: bool = JSON) -> None:
    """Follow a run with a progress bar until it ends; exit 1 if it ends Failed or
    Canceled (0 if Completed, even with failed lines: the summary counts them)."""
    with client() as c:
        run = _follow(c, c.get_run(name), bar=True)
        _show(c, run, json=json)
    _exit_as_ended(run)


def _exit_as_ended(run: Run) -> None:
    """The exit of ``--stream`` and ``run stream`` says how the run ended, as pf's: 0
    Completed (failed lines counted in its summary, and named here), 1 Failed or Canceled
    (why, on stderr), 130 when the waiting was stopped (Ctrl-C) before the run ended."""
    if run.status == RunStatus.COMPLETED:
        if run.failed:
            err.print(f"[yellow]warning:[/] run {escape(run.name)} completed with "
                      f"{run.failed} of {run.total} line(s) failed: flowsession run "
                      f"show-details {escape(run.name)}",
                      highlight=False)
        return
    if run.status == RunStatus.FAILED:
        err.print(f"[bold red]error:[/] run {escape(run.name)} failed: "
                  f"{escape(run.error or 'no reason was recorded')}", highlight=False)
        err.print(f"[yellow]hint:[/] its log says more: flowsession run logs "
                  f"{escape(run.name)}",
                  highlight=False)
        raise typer.Exit(1)
    if run.status == RunStatus.CANCELED:
        err.print(f"[bold red]error:[/] run {escape(run.name)} was canceled "
                  f"({escape(run.summary())})" + (f": {escape(run.error)}" if run.error else ""),
                  highlight=False)
        raise typer.Exit(1)
    raise typer.Exit(130)  # not ended: the waiting was stopped (the run goes on)


@app.command()
@handle_errors
def show(name: str = NAME, json: bool = JSON) -> None:
    """A run's status and summary."""
    with client() as c:
        run = c.get_run(name)
        _show(c, run, json=json)


@app.command("show-details")
@handle_errors
def show_details(
    name: str = NAME,
    max_results: int = typer.Option(100, "--max-results", "-r", help="Lines to show."),
    all_results: bool = typer.Option(False, "--all-results", help="Show every line."),
    json: bool = JSON,
) -> None:
    """Inputs and outputs of each line; (Failed) where a line failed."""
    with client() as c:
        c.get_run(name)  # brings the run up to date (and says if it does not exist)
        rows = c.get_details(name)
    if not all_results:
        rows = rows[:max_results]
    if json:
        return emit_json(rows)
    in_cols = list(dict.fromkeys(k for r in rows for k in r["inputs"]))
    out_cols = list(dict.fromkeys(k for r in rows for k in (r["outputs"] or {})))
    flat = []
    for r in rows:
        row: dict[str, Any] = {"line_number": r["line_number"]}
        row.update({f"inputs.{k}": _cell(r["inputs"].get(k)) for k in in_cols})
        for k in out_cols:
            row[f"outputs.{k}"] = ("(Failed)" if r["status"] == LineStatus.FAILED else
                                   "" if r["outputs"] is None else _cell(r["outputs"].get(k)))
        if not out_cols:
            row["outputs"] = "(Failed)" if r["status"] == LineStatus.FAILED else ""
        row["status"] = r["status"]
        flat.append(row)
    columns = ["line_number", *[f"inputs.{k}" for k in in_cols],
               *([f"outputs.{k}" for k in out_cols] or ["outputs"]), "status"]
    table(flat, columns)
    failed = [r for r in rows if r["status"] == LineStatus.FAILED]
    for r in failed[:5]:
        err.print(f"line {r['line_number']} failed: {r['error']}", highlight=False,
                  markup=False)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    text = value if isinstance(value, str) else jsonlib.dumps(value, default=str)
    return text if len(text) <= 80 or piped() else text[:77] + "..."  # whole through a pipe


@app.command("show-metrics")
@handle_errors
def show_metrics(name: str = NAME, json: bool = JSON) -> None:
    """The metrics the flow's aggregation logged (log_metric)."""
    with client() as c:
        c.get_run(name)
        metrics = c.get_metrics(name)
    if json:
        return emit_json(metrics)
    if not metrics:
        out.print("no metrics (the flow has no aggregation node that calls log_metric, or the "
                  "run has not ended)")
        return
    table([{"metric": k, "value": v} for k, v in metrics.items()], ["metric", "value"])


@app.command("list")
@handle_errors
def list_(
    max_results: int = typer.Option(50, "--max-results", "-r", help="Runs to show."),
    all_results: bool = typer.Option(False, "--all-results", help="Show every run."),
    json: bool = JSON,
) -> None:
    """Your runs, newest first."""
    with client() as c:
        runs = c.list_runs(None if all_results else max_results)
    rows = [_run_dict(r) for r in runs]
    if json:
        return emit_json(rows)
    table(rows, ["name", "status", "summary", "flow", "created", "duration"])


@app.command()
@handle_errors
def logs(
    name: str = NAME,
    tail: int = typer.Option(0, "--tail", "-n", help="Only the last N lines of each log."),
    json: bool = JSON,
) -> None:
    """The run's log, then its workers' logs."""
    with client() as c:
        logs_ = c.get_logs(name)
    if tail:
        logs_ = [{**log, "text": "\n".join(log["text"].splitlines()[-tail:])} for log in logs_]
    if json:
        return emit_json(logs_)
    for log in logs_:
        out.print(f"[bold]--- {log['name']} ---[/]", highlight=False)
        sys.stdout.write(log["text"].rstrip("\n") + "\n")
        sys.stdout.flush()


@app.command()
@handle_errors
def cancel(name: str = NAME, json: bool = JSON) -> None:
    """Cancel a run: lines running stop; the results so far are kept."""
    with client() as c:
        run = c.cancel(name)
        _show(c, run, json=json)

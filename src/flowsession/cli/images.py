"""``flowsession image ...``: through the server (see ``cli/connect.py``)."""

from __future__ import annotations

from pathlib import Path

import typer

from flowsession.access import USER_IDENTITY
from flowsession.cli.connect import client
from flowsession.cli.output import emit_json, err, fields, handle_errors, out, progress, table
from flowsession.config import format_size
from flowsession.environments import DEFAULT_IMAGE

app = typer.Typer(no_args_is_help=True)
JSON = typer.Option(False, "--json", help="Print machine-readable JSON.")


def _row(image: dict) -> dict:
    d = dict(image)
    d["size"] = format_size(d["size_bytes"]) if d.get("size_bytes") else ""
    d["parent"] = d.get("parent") or ""
    return d


@app.command("list")
@handle_errors
def list_(json: bool = JSON) -> None:
    """List images and their versions."""
    with client() as c:
        images = c.list_images()
    if json:
        return emit_json(images)
    table([_row(i) for i in images], ["ref", "state", "parent", "packages", "size", "description"])


@app.command()
@handle_errors
def show(name: str = typer.Argument(DEFAULT_IMAGE, help="NAME or NAME:VERSION"),
         json: bool = JSON) -> None:
    """Show an image and the packages it holds."""
    with client() as c:
        data = c.get_image(name)
    if json:
        return emit_json(data)
    fields(data, ("ref", "state", "parent", "description", "python_version", "path", "error"))
    if data["installed"]:
        table([{"name": n, "version": v} for n, v in data["installed"].items()],
              ["name", "version"], title=f"{len(data['installed'])} packages")


@app.command()
@handle_errors
def build(name: str = typer.Argument(DEFAULT_IMAGE, help="NAME or NAME:VERSION"),
          json: bool = JSON) -> None:
    """Build an image now (images are otherwise built on first use)."""
    with client() as c, progress(f"building image {name} ...", lines=True) as on_progress:
        image = c.build_image(name, on_progress=on_progress)
    if json:
        return emit_json(image)
    out.print(f"image {image['ref']} ready at {image['path']}", highlight=False)


@app.command()
@handle_errors
def create(
    name: str = typer.Argument(..., help="The new image's name; versions are numbered for you."),
    base: str = typer.Option(DEFAULT_IMAGE, "--from", help="The image to extend."),
    requirements: Path = typer.Option(None, "-r", "--requirements", help="Packages to add "
                                      "(index packages; local wheels on your own server)."),
    dockerfile: Path = typer.Option(None, "--from-dockerfile", help="A prompt flow runtime "
                                    "Dockerfile (FROM the runtime image, COPY requirements.txt,"
                                    " RUN pip install ...) instead of --from and -r."),
    description: str = typer.Option("", help="What the image is for."),
    identity: str = typer.Option(USER_IDENTITY, help="Whose feed secrets fill {private}."),
    json: bool = JSON,
) -> None:
    """Create a custom image: another image plus packages (or from a Dockerfile)."""
    if (requirements is None) == (dockerfile is None):
        raise typer.BadParameter("give -r REQUIREMENTS or --from-dockerfile DOCKERFILE (one)",
                                 param_hint="-r / --from-dockerfile")
    source = dockerfile or base
    with client() as c, progress(f"creating {name} from {source} ...",
                                 lines=True) as on_progress:
        image = c.create_image(name, requirements=requirements, base=base,
                               description=description, identity=identity,
                               dockerfile=dockerfile, on_progress=on_progress)
    if json:
        return emit_json(image)
    out.print(f"image {image['ref']} created over {image['parent']}", highlight=False)


@app.command()
@handle_errors
def check(flow: Path = typer.Argument(..., help="The flow folder."), json: bool = JSON) -> None:
    """Does the flow's image have a newer version?"""
    from flowsession.environments.images import flow_image  # the store: this command only
    from flowsession.flows.flowfile import load_flow  # yaml: only this command needs it

    ref, note = flow_image(load_flow(flow).image)  # the flow's own file says which image
    if note:
        err.print(note, highlight=False)
    with client() as c:
        result = c.check_image(ref)
    if json:
        return emit_json(result)
    if result["newer_available"]:
        out.print(f"{ref}: version {result['newest_version']} is available "
                  f"(the flow uses {result['current_version']}). Set environment.image to "
                  f"{result['name']}:{result['newest_version']} and reset the session.",
                  highlight=False)
    elif not result["pinned"]:
        out.print(f"{ref}: the flow follows the newest version ({result['newest_version']}).",
                  highlight=False)
    else:
        out.print(f"{ref}: up to date.", highlight=False)

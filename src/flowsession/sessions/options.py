"""The settings a session starts with: ``StartOptions`` (default or advanced settings), checked
before anything is made (``check_options``), and the guard that work asking for an identity, a
VM size or an instance runs only on a session that has them (``runs_as_asked``)."""

from __future__ import annotations

from dataclasses import dataclass

from flowsession.computes.service import ComputeKind, ComputeService
from flowsession.errors import Conflict, InvalidInput
from flowsession.sessions.records import Session


@dataclass(frozen=True)
class StartOptions:
    """Start with advanced settings. None means the default."""

    compute_type: str | None = None  # "serverless" | "instance"
    vm_size: str | None = None  # serverless only
    instance: str | None = None  # instance only
    idle_timeout_s: float | None = None
    identity: str | None = None  # serverless only (an instance uses its own)
    image: str | None = None  # serverless only; else the flow's environment.image
    implicit: bool = False  # started by a test line or a run: the smallest VM size


def check_options(o: StartOptions, computes: ComputeService) -> ComputeKind:
    """The compute type the options make, or InvalidInput saying which option is wrong
    (before anything is made)."""
    try:
        kind = ComputeKind(o.compute_type or (ComputeKind.INSTANCE if o.instance
                                              else ComputeKind.SERVERLESS))
    except ValueError:
        raise InvalidInput(f"compute type '{o.compute_type}' is not one of "
                           f"{', '.join(ComputeKind)}") from None
    if kind == ComputeKind.INSTANCE:
        if not o.instance:
            raise InvalidInput("a session on a compute instance needs --instance NAME",
                               hint="list your instances: flowsession compute list")
        given = [n for n, v in (("--vm-size", o.vm_size), ("--identity", o.identity),
                                ("--image", o.image)) if v]
        if given:
            raise InvalidInput(
                f"{', '.join(given)} cannot be set for a session on a compute instance: its "
                "VM size and identity are the instance's, and its image is the flow's",
                hint="drop them, or use --compute-type serverless")
    elif o.instance:
        raise InvalidInput("--instance needs --compute-type instance")
    if o.vm_size:
        computes.size(o.vm_size)  # an unknown size fails before anything is made
    return kind


def runs_as_asked(session: Session, options: StartOptions, computes: ComputeService) -> None:
    """Work that names an identity, a VM size or an instance never runs on a session that
    is something else (it would run as another identity, on another compute)."""
    compute = (computes.get(session.compute_id, user=session.owner)
               if session.compute_id else None)
    asked = {"identity": options.identity if options.identity not in (None, "user") else None,
             "vm_size": options.vm_size, "instance": options.instance}
    has = {"identity": session.identity,
           "vm_size": compute.vm_size if compute else session.vm_size,
           "instance": compute.name if compute and compute.kind == ComputeKind.INSTANCE
           else None}
    for field, want in asked.items():
        if want and want != has[field]:
            raise Conflict(
                f"the flow's session {session.id} runs with {field} "
                f"{has[field] or 'default'!s}, not {want}",
                hint="stop it (flowsession session stop FLOW) or change it (flowsession "
                     "session update FLOW), then submit again",
                details={"field": field, "session": session.id})

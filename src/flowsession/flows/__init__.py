"""Flow folders: read and check ``flow.dag.yaml`` / ``flow.flex.yaml``, and snapshot them.

``load_flow`` turns a folder into a checked ``FlowDefinition``; ``make_snapshot`` copies it
(with its ``additional_includes``) into an immutable, content-addressed folder that sessions
run from. Every problem is a ``FlowFileError`` naming file, line and field.
"""

from flowsession.flows.flowfile import (
    DEFAULT_REQUIREMENTS,
    FLOW_FILE_NAMES,
    FlowDefinition,
    include_name,
    load_flow,
    locate_line,
)
from flowsession.flows.snapshot import Snapshot, make_snapshot, snapshot_id_of

__all__ = [
    "DEFAULT_REQUIREMENTS",
    "FLOW_FILE_NAMES",
    "FlowDefinition",
    "Snapshot",
    "include_name",
    "load_flow",
    "locate_line",
    "make_snapshot",
    "snapshot_id_of",
]

"""The process that IS a running session: a supervisor in the flow's environment, plus warm
workers with the flow loaded, answering requests on a Unix socket.

    python -m flowsession.worker.supervisor --socket PATH --state-dir DIR [--standby]
        [--flow DIR] [--site-dir DIR ...] [--idle-timeout S] [--workers N] [--line-timeout S]

The protocol, the phases and the files in the state dir: ``flowsession.worker.protocol``.
The state machine: ``flowsession.worker.session``; its I/O loop: ``flowsession.worker.loop``;
the workers: ``flowsession.worker.workers``. Stdlib and promptflow only.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from flowsession.worker.offline import promptflow_offline
from flowsession.worker.protocol import DEFAULT_LINE_TIMEOUT, LOG_FILE
from flowsession.worker.session import Supervisor


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m flowsession.worker.supervisor",
                                description="A flow session: a supervisor and warm workers.")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", help="the Unix socket to bind and answer on")
    where.add_argument("--listen-fd", type=int,
                       help="a listening Unix socket to answer on, bound by the starter")
    p.add_argument("--log-inherit", action="store_true",
                   help="log to the stderr we were given (the starter's file), not to "
                        "DIR/supervisor.log")
    p.add_argument("--state-dir", required=True, help="supervisor.log, exit.json, status.json")
    p.add_argument("--standby", action="store_true", help="wait for an adopt request")
    p.add_argument("--flow", help="the flow's folder (required without --standby)")
    p.add_argument("--site-dir", action="append", default=[], help="site-packages to add")
    p.add_argument("--idle-timeout", type=float, default=0.0, help="seconds; 0 means never")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--line-timeout", type=float, default=DEFAULT_LINE_TIMEOUT,
                   help="seconds a line may run unless its request says; 0 means no limit")
    args = p.parse_args(argv)
    if not args.standby and not args.flow:
        p.error("--flow is required without --standby")
    return args


def _detach_output(log_path: Path | None) -> None:
    """stdin from /dev/null; stdout, stderr and logging into ``log_path`` (None: into the
    stderr we were given)."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    if log_path is None:
        os.dup2(2, 1)
    else:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True,
                        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    state_dir = Path(args.state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    _detach_output(None if args.log_inherit else state_dir / LOG_FILE)
    work = state_dir.parent / "work"
    os.chdir(work if work.is_dir() else state_dir)
    promptflow_offline()  # before any promptflow import: its telemetry is off
    try:
        os.setsid()  # outlive the starter's session and terminal
    except OSError:
        pass  # already a session leader
    code = Supervisor(args, state_dir).run()
    logging.shutdown()
    return code


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # the import thread (daemon) may still run if we stop while importing

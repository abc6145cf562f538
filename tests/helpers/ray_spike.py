"""The spike of a Ray session (issue 13), before the backend exists.

``SessionActor`` runs in Ray's own interpreter (the control plane's venv, which has ray) and
starts the session as a child process in the *flow's* interpreter: the image venv's python with
the environment's site-packages added, as the local backend starts its supervisor. It talks to
that child over a Unix socket and hands back only data. Nothing crosses a shared disk: the
child's code (``SUPERVISOR``, a stand-in for ``flowsession.worker.supervisor``) travels as a
string, its socket lives in a private temp dir of the node, its answers come back as values.

The child watches a pipe from the actor (its stdin) and exits when it closes, so it dies with
the actor even when the actor's node dies (a raylet killed takes its workers with it; a
setsid'd child would otherwise be left running). PR_SET_PDEATHSIG is no substitute: it fires
when the *thread* that forked the child exits, and actor methods may run on pool threads.

Stdlib and ray only; the test registers this module to be pickled by value, since Ray's
workers cannot import ``helpers``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Any

SUPERVISOR = r'''
import importlib.util, json, os, site, socket, sys, threading, time

sock_path, *site_dirs = sys.argv[1:]
for d in site_dirs:
    site.addsitedir(d)


def watch_parent():
    sys.stdin.buffer.read()  # EOF: the actor that started us is gone
    os._exit(0)


def answer(req):
    if req.get("op") == "where":
        return {"executable": sys.executable, "prefix": sys.prefix, "pid": os.getpid(),
                "importable": {m: importlib.util.find_spec(m) is not None
                               for m in req.get("modules", [])}}
    if req.get("op") == "sleep":
        time.sleep(float(req["seconds"]))
        return {"slept": float(req["seconds"])}
    return {"error": "unknown op"}


def serve(conn):
    with conn, conn.makefile("rwb") as f:
        for line in f:
            f.write(json.dumps(answer(json.loads(line))).encode() + b"\n")
            f.flush()


threading.Thread(target=watch_parent, daemon=True).start()
srv = socket.socket(socket.AF_UNIX)
srv.bind(sock_path)
srv.listen()
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
'''


class SessionActor:
    """Wrap with ``ray.remote(...)``; ``python`` and ``site_dirs`` are the flow's environment
    on the node it lands on."""

    def __init__(self, python: str, site_dirs: list[str], code: str = SUPERVISOR,
                 base_dir: str | None = None, start_timeout: float = 30.0):
        # a node-local folder; a session whose node died leaves it behind (the node's next
        # agent must sweep such folders), so tests put it under the cluster's own dir
        self.dir = tempfile.mkdtemp(prefix="fs-session-", dir=base_dir)
        self.socket = os.path.join(self.dir, "s.sock")
        self.stderr = open(os.path.join(self.dir, "stderr"), "w+b")
        self.child = subprocess.Popen([python, "-c", code, self.socket, *site_dirs],
                                      stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                      stderr=self.stderr, start_new_session=True)
        deadline = time.monotonic() + start_timeout
        while not os.path.exists(self.socket):
            if self.child.poll() is not None or time.monotonic() > deadline:
                self.stderr.seek(0)
                raise RuntimeError("the session did not start: "
                                   + self.stderr.read()[-2000:].decode(errors="replace"))
            time.sleep(0.01)

    def call(self, request: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(timeout)
            s.connect(self.socket)
            with s.makefile("rwb") as f:
                f.write(json.dumps(request).encode() + b"\n")
                f.flush()
                return json.loads(f.readline())

    def child_pid(self) -> int:
        return self.child.pid

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def stop(self) -> int | None:
        self.child.stdin.close()  # the child's cue to exit
        try:
            code = self.child.wait(10)
        except subprocess.TimeoutExpired:
            self.child.kill()
            code = self.child.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
        return code


class Probe:
    """An actor that reports the interpreter it runs in."""

    def where(self, modules: list[str]) -> dict[str, Any]:
        import importlib.util
        import sys

        return {"executable": sys.executable, "prefix": sys.prefix,
                "importable": {m: importlib.util.find_spec(m) is not None for m in modules}}

"""The ``Client``'s flows: a flow lives on the server by name.

A local flow folder given where a flow is expected is uploaded once (its text files and its
includes: ``client/upload.py``; name = the folder's name) and reused afterwards; when it is
already registered by you, files that differ from the local ones are saved to it (Save only: a
changed ``requirements.txt`` takes effect with ``install``). On this home's local server
(``flows_by_path``) a folder is registered by its path instead: the server reads the folder
itself, so edits apply as they are made.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from flowsession.client.http import Http, error_from_dict, q
from flowsession.client.upload import collect_files
from flowsession.errors import Conflict, FlowSessionError, Forbidden, InvalidInput
from flowsession.worker.protocol import FLOW_FILES


class Flows:
    """Mixed into ``Client``."""

    _http: Http
    flows_by_path: bool
    _flows: dict[str, str]  # a local folder -> its registered name

    def get_flow(self, name: str) -> dict[str, Any]:
        """A registered flow: ``name``, ``owner``, ``path``, ``uploaded``."""
        return self._http.request("GET", f"/api/flows/{q(name)}")

    def register_flow(self, name: str, path: str | Path, *,
                      on_server: bool = False) -> dict[str, Any]:
        """Register the flow folder ``path`` as ``name``: uploaded (its text files), or with
        ``on_server=True`` a folder of the server's machine (needs all:manage)."""
        if on_server:
            body = {"name": name, "path": str(path)}
        else:
            folder = _local_folder(path)
            if folder is None:
                raise InvalidInput(f"flow folder {path} does not exist",
                                   details={"flow": str(path)})
            body = {"name": name, "files": collect_files(folder)}
        flow = self._http.long("POST", "/api/flows", json=body)
        if not on_server:
            self._flows[str(_local_folder(path))] = name
        return flow

    def read_flow_file(self, flow: str | Path, path: str) -> str:
        name = self._flow_name(flow, upload=False)
        return self._http.request("GET", f"/api/flows/{name}/files/{path}")["content"]

    def write_flow_file(self, flow: str | Path, path: str, content: str) -> None:
        """Save only: a running session is not touched (``install`` applies a changed
        requirements.txt; other files take effect at the next line)."""
        name = self._flow_name(flow, upload=False)
        self._http.request("PUT", f"/api/flows/{name}/files/{path}", json={"content": content})

    # --- a flow argument -> its registered name --------------------------------------------

    def _flow_name(self, flow: str | Path, *, upload: bool = True) -> str:
        """The registered name of ``flow``: a name as given, or a local folder (uploaded when
        ``upload`` and not registered yet; otherwise its folder name)."""
        folder = _local_folder(flow)
        if folder is None:
            if isinstance(flow, Path) or "/" in str(flow) or "\\" in str(flow):
                raise InvalidInput(f"flow {flow} is not a folder on this machine, nor a "
                                   "registered flow's name",
                                   hint="give a flow folder, or the name of a flow on the "
                                        "server (GET /api/flows)", details={"flow": str(flow)})
            return str(flow)
        key = str(folder)
        if key in self._flows:
            return self._flows[key]
        if self.flows_by_path:
            name = self._flow_by_path(folder)
            if name is not None:
                self._flows[key] = name
                return name
        name = folder.name
        if not upload:
            return name
        files = collect_files(folder)
        try:
            flow_info = self._http.request("GET", f"/api/flows/{name}")
        except FlowSessionError as exc:
            if exc.code != "not_found":
                raise
            self._http.long("POST", "/api/flows", json={"name": name, "files": files})
        else:
            if flow_info["owner"] != self._http.me()["user"]:
                raise error_from_dict({
                    "code": "conflict", "message": f"flow {name!r} on the server is "
                    f"{flow_info['owner']}'s, not yours",
                    "hint": f"register the folder under another name: "
                            f"register_flow('other-name', {str(folder)!r})", "flow": name})
            if flow_info.get("uploaded"):
                self._sync(name, files, set(flow_info.get("files", [])))
        self._flows[key] = name
        return name

    def _flow_by_path(self, folder: Path) -> str | None:
        """The name of my flow registered with this folder's path, registering it when it is
        not (as the folder's name, or with a suffix when I have another flow of that name).
        None when my roles may not register folders of the server's machine (upload then)."""
        me = self._http.me()["user"]

        def registered() -> str | None:
            for flow in self._http.request("GET", "/api/flows"):
                if flow["owner"] == me and flow["path"] == str(folder):
                    return flow["name"]
            return None

        found = registered()
        if found is not None:
            return found
        base = re.sub(r"[^A-Za-z0-9_.-]", "-", folder.name).lstrip(".-") or "flow"
        digest = hashlib.sha256(str(folder).encode()).hexdigest()
        for name in (base, f"{base}-{digest[:8]}", f"{base}-{digest[:16]}"):
            try:
                self._http.long("POST", "/api/flows", json={"name": name, "path": str(folder)})
            except Forbidden:
                return None
            except Conflict:  # another flow of mine has that name (or a command running
                found = registered()  # at the same time registered this folder first)
                if found is not None:
                    return found
                continue
            return name
        raise Conflict(f"cannot register flow folder {folder}: its names are taken",
                       hint="unregister one of your flows (DELETE /api/flows/NAME)",
                       details={"flow": str(folder)})

    def _sync(self, name: str, files: dict[str, str], remote: set[str]) -> None:
        """Save the local files that differ from the registered flow's (never deletes)."""
        for rel, text in files.items():
            if rel in remote:
                current = self._http.request("GET", f"/api/flows/{name}/files/{rel}")["content"]
                if current == text:
                    continue
            self._http.request("PUT", f"/api/flows/{name}/files/{rel}", json={"content": text})


def _local_folder(flow: str | Path) -> Path | None:
    """The flow folder ``flow`` names on this machine (the folder, or its flow YAML)."""
    path = Path(flow).expanduser()
    if path.is_file() and path.name in FLOW_FILES:
        path = path.parent
    return path.resolve() if path.is_dir() else None

"""What an error answer may tell a caller about the server's machine.

Those who manage the server (``all:manage``, the Owner) are told everything. Anyone else is
told no path of the server outside their own flow folders: an error's details that only
locate server files (a build log's ``log_path``) are left out, and the server's folders (its
home, its sessions' folders, its images) read as ``<home>``, ``<sessions>`` and ``<images>``
wherever an error's text quotes them.

The sources already name a flow's files by their path in the flow (``load_flow``'s root); this
is the net under what quotes paths it does not choose: a build tool's output, a worker's
traceback, a message written before this rule.
"""

from __future__ import annotations

import os
import re
from typing import Any

from flowsession.access.accounts import Principal
from flowsession.config import Settings

SERVER_ONLY_DETAILS = frozenset({"log_path"})


class PublicErrors:
    def __init__(self, settings: Settings):
        roots: dict[str, str] = {}
        for path, label in ((settings.home, "<home>"), (settings.runtime_dir, "<sessions>"),
                            (settings.images_dir, "<images>")):
            for form in (os.path.abspath(path), os.path.realpath(path)):
                if len(form) > 1:  # never "/"
                    roots.setdefault(form, label)
        # the longest first; a root only where a path ends or goes on (not "<home>2")
        self.roots = [(re.compile(re.escape(path) + r"(?![\w.-])"), label) for path, label
                      in sorted(roots.items(), key=lambda kv: -len(kv[0]))]

    def for_caller(self, error: dict[str, Any] | None, who: Principal | None
                   ) -> dict[str, Any] | None:
        """``error`` (an error's ``to_dict()``) as ``who`` may see it."""
        if error is None or (who is not None and who.manages_all):
            return error
        return {k: self._scrub(v) for k, v in error.items() if k not in SERVER_ONLY_DETAILS}

    def _scrub(self, value: Any) -> Any:
        if isinstance(value, str):
            for path, label in self.roots:
                value = path.sub(label, value)
            return value
        if isinstance(value, dict):
            return {k: self._scrub(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._scrub(v) for v in value]
        return value

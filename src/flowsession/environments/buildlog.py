"""One build log per environment or image. Secrets handed to a build are redacted before any
line is written, so neither the log file nor an error quoting its tail can hold them."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from urllib.parse import quote

REDACTED = "****"


def userinfo(secret: str) -> str:
    """A feed secret ('user:password' or a token) as the userinfo part of a URL."""
    user, sep, password = secret.partition(":")
    return f"{quote(user, safe='')}:{quote(password, safe='')}" if sep else quote(user, safe="")


def secret_forms(secret: str) -> set[str]:
    """The secret raw, URL-encoded, as URL userinfo, and its password alone (raw and encoded)."""
    forms = {secret, quote(secret, safe=""), quote(secret, safe=":"), userinfo(secret)}
    if ":" in secret:
        password = secret.split(":", 1)[1]
        forms |= {password, quote(password, safe="")}
    return forms


class BuildLog:
    """``on_line``, when given, sees every line written (redacted): a build's progress."""

    def __init__(self, path: Path, *, secrets: Iterable[str] = (),
                 on_line: Callable[[str], None] | None = None):
        self.path = path
        self.on_line = on_line
        path.parent.mkdir(parents=True, exist_ok=True)
        self._secrets: list[str] = []
        for s in secrets:
            self.add_secret(s)
        self._fh = path.open("a", encoding="utf-8")

    def add_secret(self, secret: str) -> None:
        """Redact ``secret`` from now on, in every form a build may print it in."""
        self._secrets.extend(f for f in secret_forms(secret) if len(f) >= 3)
        self._secrets.sort(key=len, reverse=True)

    def redact(self, text: str) -> str:
        for s in self._secrets:
            text = text.replace(s, REDACTED)
        return text

    def write(self, text: str) -> None:
        text = self.redact(text)
        self._fh.write(text)
        self._fh.flush()
        if self.on_line is not None:
            for line in text.splitlines():
                if line.strip():
                    try:
                        self.on_line(line.rstrip())
                    except Exception:  # noqa: BLE001 - a listener never breaks a build
                        self.on_line = None

    def step(self, message: str) -> None:
        self.write(f"[{time.strftime('%H:%M:%S')}] {message}\n")

    def tail(self, lines: int = 25) -> str:
        return tail(self.path, lines)

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> BuildLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])

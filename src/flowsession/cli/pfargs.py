"""prompt flow's way of giving several values to one flag: ``--inputs a=1 b=2`` and
``--column-mapping 'a=${data.a}' 'b=${data.b}'`` (``pf`` declares these ``nargs="+"``), as well
as the repeated form ``--inputs a=1 --inputs b=2``.

Click (vendored by Typer) takes one value per occurrence of an option, so a command made with ``cls=PfCommand``
rewrites its arguments before Click parses them: after a repeatable (list) option, each
following word that is a ``key=value`` pair (and not a flag) becomes another occurrence of
that option. A word without ``=`` ends the list, so a positional argument may follow.
"""

from __future__ import annotations

from typing import Any

from typer.core import TyperCommand


def spread(args: list[str], options: set[str]) -> list[str]:
    """``["--inputs", "a=1", "b=2", "flow"]`` -> ``["--inputs", "a=1", "--inputs", "b=2",
    "flow"]`` for ``options={"--inputs"}``. Words after ``--`` are left alone."""
    out: list[str] = []
    current: str | None = None  # the list option whose values are being read
    expect_value = False
    for i, word in enumerate(args):
        if word == "--":
            out.extend(args[i:])
            break
        if expect_value:  # the value right after the flag: Click (vendored by Typer) takes it as it is
            out.append(word)
            expect_value = False
            continue
        if word in options:
            out.append(word)
            current, expect_value = word, True
            continue
        if current and not word.startswith("-") and "=" in word:
            out.extend((current, word))
            continue
        current = word.partition("=")[0] if word.startswith("--") and "=" in word \
            and word.partition("=")[0] in options else None
        out.append(word)
    return out


class PfCommand(TyperCommand):
    """A Typer command whose list options take several values after one flag, as pf's do."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        options = {opt for p in self.params if getattr(p, "multiple", False)
                   for opt in p.opts if opt.startswith("--")}
        return super().parse_args(ctx, spread(list(args), options))


def flow_ref(arg: str, c: Any = None):
    """A FLOW argument: the folder (or flow YAML) when one is there, else a registered flow's
    name (``NAME``, or ``OWNER:NAME`` for those who manage everything). With a client ``c``,
    a name the server does not know is refused here, saying it is neither."""
    from pathlib import Path

    from flowsession.errors import Forbidden, InvalidInput, NotFound

    path = Path(arg).expanduser()
    if path.exists() or "/" in arg or arg in (".", ".."):
        return path
    if c is not None:
        try:
            c.get_flow(arg)
        except (NotFound, Forbidden):
            raise InvalidInput(f"flow {arg} is not a folder on this machine, nor a registered "
                               "flow's name", hint="give a flow folder, or the name of a flow "
                               "on the server (GET /api/flows)", details={"flow": arg}) from None
    return arg

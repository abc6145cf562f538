"""Flow folders and small helpers for tests."""

from __future__ import annotations

import asyncio
from pathlib import Path


def make_flow(root: Path, name: str, requirements: str | None, *, image: str | None = None,
              extra_yaml: str = "") -> Path:
    """A one-node dag flow folder with the given requirements.txt."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    env = ["environment:"]
    if image:
        env.append(f"  image: {image}")
    if requirements is not None:
        env.append("  python_requirements_txt: requirements.txt")
    (folder / "flow.dag.yaml").write_text(
        ("\n".join(env) + "\n" if len(env) > 1 else "") + extra_yaml +
        "inputs:\n  x:\n    type: string\noutputs:\n  y:\n    type: string\n"
        "    reference: ${echo.output}\nnodes:\n- name: echo\n  type: python\n"
        "  source:\n    type: code\n    path: echo.py\n  inputs:\n    x: ${inputs.x}\n")
    (folder / "echo.py").write_text(
        "from promptflow.core import tool\n\n\n@tool\ndef echo(x: str) -> str:\n    return x\n")
    if requirements is not None:
        (folder / "requirements.txt").write_text(requirements)
    return folder


# A one-node flow: ``hello`` in hello.py greets ``name`` (each test writes hello.py).
HELLO_DAG = """\
inputs:
  name:
    type: string
outputs:
  greeting:
    type: string
    reference: ${hello.output}
nodes:
- name: hello
  type: python
  source:
    type: code
    path: hello.py
  inputs:
    name: ${inputs.name}
"""

# A two-input flow whose one node, ``slow`` in slow.py, takes ``text`` and ``seconds`` (each test
# writes the tool it needs).
SLOW_YAML = """inputs:
  text:
    type: string
  seconds:
    type: string
outputs:
  out:
    type: string
    reference: ${slow.output}
nodes:
- name: slow
  type: python
  source:
    type: code
    path: slow.py
  inputs:
    text: ${inputs.text}
    seconds: ${inputs.seconds}
"""


def run(coro):
    return asyncio.run(coro)

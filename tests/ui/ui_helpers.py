"""What the web UI's browser tests share: the flow they upload, signing in, screenshots."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from urllib.parse import quote

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
# A flow with what the graph must show: an input with a default, a conditional node (bypassed
# unless `shout` is true), an aggregation node with a metric, and a requirements file.
FLOW = {
    "flow.dag.yaml": """\
environment:
  python_requirements_txt: requirements.txt
inputs:
  name:
    type: string
    default: world
  shout:
    type: bool
    default: false
outputs:
  greeting:
    type: string
    reference: ${greet.output}
nodes:
- name: greet
  type: python
  source: {type: code, path: greet.py}
  inputs: {name: "${inputs.name}"}
- name: loud
  type: python
  source: {type: code, path: loud.py}
  inputs: {text: "${greet.output}"}
  activate: {when: "${inputs.shout}", is: true}
- name: count
  type: python
  source: {type: code, path: count.py}
  inputs: {greetings: "${greet.output}"}
  aggregation: true
""",
    "greet.py": "from promptflow.core import tool\n\n\n@tool\ndef greet(name: str) -> str:\n"
                "    return f'hello {name}'\n",
    "loud.py": "from promptflow.core import tool\n\n\n@tool\ndef loud(text: str) -> str:\n"
               "    return text.upper()\n",
    "count.py": "from promptflow.core import log_metric, tool\n\n\n@tool\n"
                "def count(greetings: list) -> int:\n    log_metric('greetings', len(greetings))\n"
                "    return len(greetings)\n",
    "requirements.txt": "",
    "data.jsonl": '{"name": "Ada"}\n{"name": "Grace"}\n{"name": "Linus"}\n',
}


def flow_zip(folder: str = "greeter") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, text in FLOW.items():
            z.writestr(f"{folder}/{name}", text)
    return buf.getvalue()


def sign_in(page, url: str, token: str, path: str = "/flows") -> None:
    page.goto(url + "/signin?next=" + quote(path, safe=""))
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"**{path}")


def shot(page, name: str, *, full_page: bool = True) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=full_page)

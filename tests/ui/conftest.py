"""The web UI in headless Chromium (Debian's /usr/bin/chromium; never `playwright install`),
against a real `flowsession server` with a local package index."""

from __future__ import annotations

import io
import zipfile
from urllib.parse import quote
from pathlib import Path

import pytest

from helpers.server import serving

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


@pytest.fixture(scope="module")
def server(tmp_path_factory, images_dir, index):
    if not CHROMIUM.exists():
        pytest.skip("chromium is not installed (make setup installs it with apt-get)")
    home = tmp_path_factory.mktemp("ui") / "home"
    with serving(home, images_dir, index.url) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM),
                              args=["--headless", "--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert not errors, f"script errors on the page: {errors}"


def sign_in(page, url: str, token: str, path: str = "/flows") -> None:
    page.goto(url + "/signin?next=" + quote(path, safe=""))
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"**{path}")


def shot(page, name: str, *, full_page: bool = True) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=full_page)

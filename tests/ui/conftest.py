"""The web UI in headless Chromium (Debian's /usr/bin/chromium; never `playwright install`),
against a real `flowsession server` with a local package index."""

from __future__ import annotations

import pytest
from helpers.server import serving
from ui_helpers import CHROMIUM


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

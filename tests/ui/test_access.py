"""Who sees what in the browser: the API's authorization, unchanged. A Reader sees no start
button; another user's compute does not appear; a bad or revoked token goes to sign-in; a
change without the page's CSRF token is refused."""

from __future__ import annotations

import re

import httpx
import pytest
from playwright.sync_api import expect

from ui_helpers import FLOW, shot, sign_in


@pytest.fixture(scope="module")
def admin(server):
    with httpx.Client(base_url=server.url + "/api", timeout=60,
                      headers={"Authorization": f"Bearer {server.token}"}) as c:
        yield c


def as_user(server, token: str) -> httpx.Client:
    return httpx.Client(base_url=server.url + "/api", timeout=60,
                        headers={"Authorization": f"Bearer {token}"})


@pytest.fixture(scope="module")
def reader(server, admin) -> str:
    """rita: a Reader with a flow of her own (uploaded while she was a Data Scientist)."""
    token = admin.post("/users", json={"name": "rita", "roles": ["Data Scientist"]}).json()["token"]
    with as_user(server, token) as rita:
        assert rita.post("/flows", json={"name": "ritas", "files": FLOW}).status_code == 201
    admin.delete("/role-assignments/rita/Data Scientist").raise_for_status()
    admin.post("/role-assignments", json={"user": "rita", "role": "Reader"}).raise_for_status()
    return token


def test_a_reader_sees_the_flow_but_no_start_button(server, page, reader):
    sign_in(page, server.url, reader)
    expect(page.locator("#flows")).to_contain_text("ritas")
    expect(page.get_by_role("button", name="Upload")).to_have_count(0)
    expect(page.get_by_role("link", name="Admin")).to_have_count(0)
    page.get_by_role("link", name="ritas").click()
    expect(page.locator('#graph [data-node="greet"]')).to_be_visible()
    expect(page.locator("#session-state")).to_have_text("NOT_STARTED")
    expect(page.get_by_role("button", name="Start compute session")).to_have_count(0)
    expect(page.get_by_role("button", name="Start with advanced settings")).to_have_count(0)
    expect(page.get_by_role("button", name="Run test")).to_have_count(0)
    expect(page.get_by_role("button", name="Save")).to_have_count(0)
    shot(page, "reader-flow")


def test_another_users_compute_does_not_appear(server, page, admin):
    admin.post("/computes", json={"name": "ada-box", "size": "small"}).raise_for_status()
    bob = admin.post("/users", json={"name": "bob", "roles": ["Data Scientist"]}).json()["token"]
    with as_user(server, bob) as c:
        c.post("/computes", json={"name": "bob-box", "size": "small"}).raise_for_status()
    sign_in(page, server.url, bob, "/computes")
    expect(page.locator("#computes")).to_contain_text("bob-box")
    expect(page.locator("#computes")).not_to_contain_text("ada-box")
    sign_in(page, server.url, server.token, "/computes")  # the Owner manages everything
    expect(page.locator("#computes")).to_contain_text("ada-box")
    expect(page.locator("#computes")).to_contain_text("bob-box")
    for name in ("ada-box", "bob-box"):
        admin.delete(f"/computes/{name}")


def test_a_bad_or_revoked_token_goes_to_sign_in(server, page, admin):
    page.goto(server.url + "/signin")
    page.get_by_label("API token").fill("fs_nothing_like_a_token")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("not valid")

    made = admin.post("/users", json={"name": "carol", "roles": ["Reader"]}).json()
    sign_in(page, server.url, made["token"], "/runs")
    admin.delete(f"/tokens/{made['token_id']}").raise_for_status()  # revoked while signed in
    page.goto(server.url + "/computes")
    expect(page).to_have_url(re.compile(r"/signin\?next=%2Fcomputes$"))
    expect(page.get_by_label("API token")).to_be_visible()


def test_a_change_without_the_pages_csrf_token_is_refused(server, page):
    sign_in(page, server.url, server.token, "/flows")
    status = page.evaluate("""async () => (await fetch('/api/flows', {method: 'POST',
        headers: {'Content-Type': 'application/json'},
        body: JSON.stringify({name: 'forged', files: {'flow.dag.yaml': 'inputs: {}'}})})).status""")
    assert status == 403
    ok = page.evaluate("""async () => (await fetch('/api/flows', {method: 'POST',
        headers: {'Content-Type': 'application/json', 'X-CSRF-Token':
                  document.querySelector('meta[name=csrf-token]').content},
        body: JSON.stringify({name: 'made', files: {'flow.dag.yaml': 'inputs: {}'}})})).status""")
    assert ok == 201
    cookies = page.context.cookies()
    session = next(c for c in cookies if c["name"] == "fs_session")
    assert session["httpOnly"] and session["sameSite"] == "Strict"
    assert page.evaluate("document.cookie") == ""  # the token is out of the scripts' reach


def test_errors_show_where_they_happen_in_the_apis_words(server, page, tmp_path):
    import io
    import zipfile

    sign_in(page, server.url, server.token)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("notaflow/readme.txt", "no flow file here")
    (tmp_path / "bad.zip").write_bytes(buf.getvalue())
    page.get_by_label("Name", exact=True).fill("broken")
    page.get_by_label("or a .zip of it, or its files").set_input_files(str(tmp_path / "bad.zip"))
    page.get_by_role("button", name="Upload").click()
    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("flow.dag.yaml")  # the API's message names what is missing
    expect(page.locator("#flows")).not_to_contain_text("broken")


def test_an_owner_makes_a_user_and_an_instance_from_the_pages(server, page, admin):
    sign_in(page, server.url, server.token, "/admin")
    page.get_by_label("New user").fill("dana")
    page.get_by_label("Role").select_option("Data Scientist")
    page.get_by_role("button", name="Create user").click()
    expect(page.locator("#users")).to_contain_text("dana")
    page.get_by_label("Token for yourself, label").fill("laptop")
    page.get_by_role("button", name="Issue token").click()
    expect(page.locator("#new-token")).to_contain_text("fs_")
    shot(page, "admin")

    page.goto(server.url + "/computes")
    page.get_by_label("Name").fill("box-one")
    page.get_by_label("Size").select_option("small")
    page.get_by_role("button", name="Create").click()
    row = page.locator("#computes tr", has_text="box-one")
    expect(row).to_be_visible()
    row.get_by_role("button", name="Delete").click()
    expect(page.locator("#computes")).not_to_contain_text("box-one")


def test_a_sign_in_posted_from_another_site_is_refused(server):
    """Login CSRF: without the sign-in form's own cookie, a valid token signs no one in."""
    r = httpx.post(server.url + "/signin", data={"token": server.token, "nonce": "guess"})
    assert r.status_code == 403 and "fs_session" not in r.cookies
    with httpx.Client(base_url=server.url) as c:  # the form's cookie and field: signed in
        nonce = re.search(r'name="nonce" value="([^"]+)"', c.get("/signin").text).group(1)
        r = c.post("/signin", data={"token": server.token, "nonce": nonce, "next": "//evil.example"})
        assert r.status_code == 303 and r.headers["location"] == "/flows"  # never off-site
        assert c.cookies.get("fs_session") == server.token


def test_a_zip_that_unpacks_too_large_is_refused_before_it_is_unpacked(server):
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("f/flow.dag.yaml", "inputs: {}\n")
        z.writestr("f/big.txt", "0" * (5 * 2**20))  # 5 MB of zeros: a few kB zipped
    assert len(buf.getvalue()) < 64 * 1024
    with httpx.Client(base_url=server.url) as c:
        nonce = re.search(r'name="nonce" value="([^"]+)"', c.get("/signin").text).group(1)
        c.post("/signin", data={"token": server.token, "nonce": nonce})
        csrf = re.search(r'name="csrf-token" content="([0-9a-f]+)"', c.get("/flows").text).group(1)
        r = c.post("/flows/upload", data={"csrf": csrf, "name": "bomb"},
                   files={"files": ("bomb.zip", buf.getvalue(), "application/zip")})
        assert r.status_code == 422 and "big.txt" in r.text and "larger than" in r.text
        assert "bomb" not in c.get("/api/flows").text

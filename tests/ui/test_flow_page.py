"""The issue's path in a browser: sign in -> upload and open a flow -> its graph -> start with
advanced settings -> edit requirements.txt, Save and install -> the package is installed ->
test one line and see its trace -> a batch run finishes -> compare with a second run -> stop.
Screenshots of the main pages go to docs/screenshots/."""

from __future__ import annotations

import re

from playwright.sync_api import expect

from ui_helpers import flow_zip, shot, sign_in

SESSION_UP = 240_000  # ms: a first environment build and start on a busy machine


def test_the_flow_page_from_sign_in_to_stop(server, page, tmp_path):
    url = server.url
    page.goto(url + "/flows")
    expect(page).to_have_url(re.compile(r"/signin\?next="))  # not signed in: to sign-in
    shot(page, "signin")
    sign_in(page, url, server.token)

    # upload the flow folder as a zip
    archive = tmp_path / "greeter.zip"
    archive.write_bytes(flow_zip())
    page.get_by_label("Name", exact=True).fill("greeter")
    page.get_by_label("or a .zip of it, or its files").set_input_files(str(archive))
    page.get_by_role("button", name="Upload").click()
    page.wait_for_url("**/flows/greeter")

    # the graph: inputs, nodes, the activate condition, the aggregation node, outputs
    graph = page.locator("#graph")
    for node in ("inputs", "greet", "loud", "count", "outputs"):
        expect(graph.locator(f'[data-node="{node}"]')).to_be_visible()
    expect(graph.locator('[data-node="count"]')).to_have_class(re.compile("aggregation"))
    expect(graph.locator('path.edge.dashed[data-src="inputs"][data-dst="loud"]')).to_have_count(1)
    expect(graph.locator('path.edge[data-src="greet"][data-dst="outputs"]')).to_have_count(1)

    # start with advanced settings: compute type -> base image -> review -> apply
    page.get_by_role("button", name="Start with advanced settings").click()
    wizard = page.locator("#wizard")
    expect(wizard.get_by_label("VM size")).to_contain_text("small")
    wizard.get_by_label("VM size").select_option("small")
    wizard.get_by_label("Idle time before the session stops").select_option("2h")
    wizard.get_by_role("button", name="Next").click()
    expect(wizard.get_by_text("Use the flow's image")).to_be_visible()
    wizard.get_by_role("button", name="Next").click()
    review = wizard.locator("#w-review")
    expect(review).to_contain_text("serverless")
    expect(review).to_contain_text("small")
    expect(review).to_contain_text("2h")
    shot(page, "start-wizard", full_page=False)
    wizard.get_by_role("button", name="Apply and start compute session").click()
    state = page.locator("#session-state")
    expect(state).to_have_text("RUNNING", timeout=SESSION_UP)
    expect(page.locator("#session-info")).to_contain_text("small")
    expect(page.get_by_text("Start compute session", exact=True)).to_be_hidden()

    page.get_by_text("Compute session running").click()
    page.get_by_role("menuitem", name="View compute session log").click()
    expect(page.locator("#oplog-status")).to_contain_text("the log of session")

    # edit requirements.txt: Save and install
    page.locator('#file-tree a[data-file="requirements.txt"]').click()
    expect(page.get_by_role("button", name="Save and install")).to_be_visible()
    expect(page.get_by_role("button", name="Save only")).to_be_visible()
    page.locator("#editor").fill("tinyalpha==1.0\n")
    page.get_by_role("button", name="Save and install").click()
    expect(page.locator("#oplog-status")).to_have_text(
        "Installing packages from requirements.txt: succeeded", timeout=SESSION_UP)
    expect(state).to_have_text("RUNNING", timeout=30_000)

    # change the session's settings in place: the idle time
    page.get_by_text("Compute session running").click()
    page.get_by_role("menuitem", name="Change compute session settings").click()
    page.locator("#settings").get_by_label("Idle time").fill("3h")
    page.locator("#settings").get_by_role("button", name="Apply").click()
    expect(page.locator("#session-info")).to_contain_text("idle time 180 min")

    # view installed packages: the new one, from the requirements; searchable
    page.get_by_text("Compute session running").click()
    page.get_by_role("menuitem", name="View installed packages").click()
    dialog = page.locator("#packages")
    expect(dialog).to_be_visible()
    expect(dialog.locator('tr[data-origin="image"]').first).to_be_attached()
    dialog.get_by_label("Search").fill("tinyalpha")
    row = dialog.locator("tbody tr")
    expect(row).to_have_count(1)
    expect(row).to_contain_text("1.0")
    expect(row).to_contain_text("requirements")
    shot(page, "installed-packages", full_page=False)
    dialog.get_by_role("button", name="Close").click()

    # reset: the session comes back, with the package still installed
    page.get_by_text("Compute session running").click()
    page.get_by_role("menuitem", name="Reset compute session").click()
    expect(page.locator("#oplog-status")).to_have_text(
        "Resetting the compute session: succeeded", timeout=SESSION_UP)
    expect(state).to_have_text("RUNNING", timeout=30_000)

    # test one line: outputs, and the trace with the bypassed node marked
    page.get_by_label("name (string)").fill("Ada")
    page.get_by_role("button", name="Run test").click()
    expect(page.locator("#test-outputs")).to_contain_text("hello Ada", timeout=120_000)
    trace = page.locator("#trace")
    expect(trace.locator('tr[data-node="greet"]')).to_contain_text("Completed")
    expect(trace.locator('tr[data-node="greet"]')).to_contain_text("Ada")  # its inputs
    expect(trace.locator('tr[data-node="loud"]')).to_contain_text("Bypassed")
    expect(graph.locator('[data-node="loud"]')).to_have_class(re.compile("st-Bypassed"))
    shot(page, "flow")

    # a batch run over data.jsonl: the mapping is suggested from its columns
    page.get_by_text("Submit a batch run").click()
    expect(page.get_by_label("name", exact=True)).to_have_value("${data.name}")
    page.get_by_label("Name (optional)").fill("greet-1")
    page.get_by_role("button", name="Submit").click()
    page.wait_for_url("**/runs/greet-1")
    expect(page.locator("#run-status")).to_have_text("Completed", timeout=180_000)
    expect(page.locator("#run-figures")).to_contain_text("3 completed, 0 failed of 3")
    expect(page.locator("#run-details tbody tr")).to_have_count(3)
    expect(page.locator("#run-details")).to_contain_text("hello Grace")
    expect(page.locator("#metrics")).to_contain_text("greetings")
    shot(page, "run")

    # a second run (on the first as its base), then compare them line by line
    page.goto(url + "/flows/greeter")
    page.get_by_text("Submit a batch run").click()
    page.get_by_label("Name (optional)").fill("greet-2")
    page.get_by_label("Base run (optional)").select_option("greet-1")
    page.get_by_role("button", name="Submit").click()
    page.wait_for_url("**/runs/greet-2")
    expect(page.locator("#run-status")).to_have_text("Completed", timeout=180_000)
    page.goto(url + "/runs")
    page.get_by_label("compare greet-1").check()
    page.get_by_label("compare greet-2").check()
    shot(page, "runs")
    page.get_by_role("button", name="Compare selected").click()
    lines = page.locator("#compare-lines")
    expect(lines.locator("thead")).to_contain_text("greet-1")
    expect(lines.locator("thead")).to_contain_text("greet-2")
    expect(lines.locator("tbody tr")).to_have_count(3)
    expect(lines.locator("tbody tr").nth(2)).to_contain_text("hello Linus")
    expect(page.locator("#compare-metrics")).to_contain_text("greetings")
    shot(page, "compare")

    # the computes page shows the session's serverless compute; then stop the session
    page.goto(url + "/computes")
    expect(page.locator("#computes")).to_contain_text("greeter: RUNNING")
    shot(page, "computes")
    page.goto(url + "/flows/greeter")
    expect(state).to_have_text("RUNNING")
    page.locator("#when-running summary").focus()  # the menu works from the keyboard
    page.keyboard.press("Enter")
    stop = page.get_by_role("menuitem", name="Stop compute session")
    expect(stop).to_be_visible()
    page.keyboard.press("Escape")
    expect(stop).to_be_hidden()
    page.keyboard.press("Enter")
    stop.focus()
    page.keyboard.press("Enter")
    expect(state).to_have_text("STOPPED", timeout=60_000)
    expect(page.get_by_role("button", name="Start compute session")).to_be_visible()
    page.goto(url + "/flows")
    shot(page, "flows")

"""bench/compat.py's document: docs/compatibility.md from the results."""

from __future__ import annotations

import json
from typing import Any

TOLERANCES = """\
- **outputs**: equal as JSON after normalising both sides: the `line_number` key is dropped;
  absolute paths of the flow's folder (pf's and flowsession's copies, the session's
  `/session/flow/<hash>`) read `<flow>`; UUIDs read `<uuid>`, ISO timestamps `<time>`; numbers
  are equal within a relative 1e-6 (NaN equals NaN); an integer under a key `id`, `*_id`
  or `*_pid` (an object's `id()`, a process id) is not compared.
- **status**: each line's Completed/Failed must be the same; a line pf has no record of
  (its run refused) must have none here either, or be failed.
- **errors**: a failed line's kind of error, where both name one as `(SomeError)` in the
  message, must be the same; the wording may differ (pf: `Process crashed while executing
  line 9`, flowsession: `the worker running this line exited with code 7`).
- **refusals**: a run pf refuses as a whole (no line ran) must be refused or fail every line
  here; messages are not compared.
- **metrics**: the same names, numbers within a relative 1e-6.
- **images**: pf saves an output image as a file beside its outputs and refers to it by
  path; flowsession gives it inline (`{"data:image/png;base64": ...}`, or openai-vision's
  `{"type": "image_url", ...}`), as pf's own serialisation does: the harness reads pf's file
  back into that form, so the bytes are compared.
- ids, run names, durations, times and token counts are not compared."""


# --- the document -----------------------------------------------------------------------------

HISTORY = [
    "Before the fixes below (2026-11-30, with the flex outputs of issue 10 already fixed; "
    "measured",
    "while the first fixes landed): 78 run by both, **57 pass, 21 fail**. Since then random",
    "flows are left out (7 of the 78). Now:",
    "",
]

COMMAND = ".venv/bin/python bench/compat.py --promptflow PATH_TO_PROMPTFLOW_CHECKOUT  # --commit SHA for an archive"


def document(results: list[Any], meta: dict[str, Any]) -> str:
    ran = [r for r in results if r.verdict != "skip"]
    passed = [r for r in ran if r.verdict == "pass"]
    intended = [r for r in ran if r.verdict == "intended"]
    skipped = [r for r in results if r.verdict == "skip"]
    reasons: dict[str, int] = {}
    for r in skipped:
        key = r.skipped.split(":")[0]
        reasons[key] = reasons.get(key, 0) + 1
    out = [
        "# Compatibility with prompt flow, flow by flow",
        "",
        "prompt flow's own test flows (`src/promptflow/tests/test_configs/flows/` and",
        "`eager_flows/` of microsoft/promptflow) run as batch runs by `pf run create`",
        "(promptflow-devkit in the default image) and by `flowsession run create` (a real",
        "server), on the same data, compared line by line. Regenerate this document with:",
        "",
        "```sh",
        COMMAND,
        "```",
        "",
        "(a checkout: `git clone https://github.com/microsoft/promptflow`; nothing of it is copied",
        "here). `bench/compat.py --help` has the options (`--only`, `--limit`, `--jobs`).",
        "",
        f"Measured: promptflow {meta.get('commit', '?')}, {meta.get('pf_version', '?')}, "
        f"{meta.get('when', '')}; {meta.get('lines', 10)} lines at most per flow.",
        "",
        "A first pass with pf takes about 40 minutes on two busy cores (pf run create costs",
        "30-90 s a flow there); pf's results are kept in a cache by the flow's content, data",
        "and pf's version (`--pf-cache`), so a pass after a change here takes about 10.",
        "",
        "## Totals",
        "",
        *HISTORY,
        f"- flows considered: **{len(results)}**",
        f"- run by both: **{len(ran)}**; pass **{len(passed)}**, differ as intended "
        f"**{len(intended)}**, fail **{len(ran) - len(passed) - len(intended)}**",
        f"- left out: **{len(skipped)}** ("
        + ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1]))
        + ")",
        "",
        "## What is compared, and the tolerances",
        "",
        TOLERANCES,
        "",
        "## How a flow is chosen, and its data",
        "",
        "A folder with `flow.dag.yaml` or `flow.flex.yaml` is left out when it has an `llm`",
        "node or a `.prompty`, refers to a connection (an input, a node's `connection`, a",
        "connection type in its code, `${...}` in `environment_variables`), reaches the network",
        "(openai, requests, urllib, ...), is C#, installs packages (`requirements.txt`),",
        "sleeps for minutes or is random by design. Its data is the first `.jsonl` (or a",
        "`.json` list) in its folder, at most the first lines; without one, a single line of",
        "its inputs'",
        "defaults (or `{}` when every input has a default); without either it is left out.",
        "No column mapping is given: both map inputs by name.",
        "",
        "## What it found, and what changed",
        "",
        "Each fix has a test on a flow written in this repository",
        "(`tests/integration/test_compat_fixes.py`, `test_flex_outputs.py`, `tests/flows/`):",
        "",
        "- a flex entry's return value is its outputs as pf gives them (a dict; a dataclass's",
        "  fields; anything else as `{\"output\": value}`), and whatever a line raises, or",
        "  however its worker dies, fails that line only;",
        "- a flow runs in its own folder, as pf runs it (relative paths find its files);",
        "- a flow input with a default keeps it unless a column mapping names it (pf: \"default",
        "  value is in higher priority than default mapping\");",
        "- images in outputs come back inline, in pf's own form;",
        "- a flex class's `__aggregate__` gives the run's metrics;",
        "- a flow's `environment_variables` are set before it loads;",
        "- a `flow.dag.yaml` with an `entry` is a flex flow;",
        "- a batch run of a DAG flow that declares no inputs is refused, as pf refuses it.",
        "",
        "Differences that are meant are marked *differs (intended)* with the reason.",
        "",
        "## Flows",
        "",
        "| flow | kind | lines | result | first difference, or why left out |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in sorted(results, key=lambda r: (r.kind, r.name)):
        verdict = {"pass": "pass", "fail": "**FAIL**", "skip": "left out",
                   "intended": "differs (intended)"}[r.verdict]
        why = r.skipped if r.verdict == "skip" else r.difference
        out.append(f"| `{r.name}` | {r.kind} | {r.lines or ''} | {verdict} | {_short(why, 220)} |")
    out.append("")
    return "\n".join(out)




def _short(value: Any, n: int = 120) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str,
                                                           ensure_ascii=False)
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= n else text[: n - 3] + "..."

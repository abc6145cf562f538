"""The README: what a new user reads first."""

from __future__ import annotations

import re
from pathlib import Path


def test_the_readme_links_nothing_outside_the_repository():
    root = Path(__file__).resolve().parents[2]
    text = (root / "README.md").read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r"<(https?://[^>]+)>", text)
    outside = [t for t in targets if re.match(r"[a-z]+:", t)]
    assert outside == [], outside
    for target in targets:  # what it links is there
        assert (root / target.split("#")[0]).exists(), target

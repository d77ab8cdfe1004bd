"""The README and docs/ pages: every relative link resolves, to a file and, with a #fragment, to a heading there."""

from __future__ import annotations

import re

from tests.helpers import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page) -> set[str]:
    return {slug(line.lstrip("#")) for line in page.read_text().splitlines() if re.match(r"#{1,6} ", line)}


def test_every_relative_link_in_the_docs_resolves():
    checked = 0
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):  # http(s), mailto: not ours to check
                continue
            path, _, fragment = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            assert dest.exists(), f"{page.name}: link to {target}: no such file"
            if fragment:
                assert fragment in anchors(dest), f"{page.name}: link to {target}: no such heading in {dest.name}"
            checked += 1
    assert checked >= 15


def test_the_slug_is_githubs():
    assert slug("RLVR (`algo=rlvr`): RL with verifiable rewards, the ScaleRL recipe") == \
        "rlvr-algorlvr-rl-with-verifiable-rewards-the-scalerl-recipe"
    assert slug("Memory: bounded by a micro-batch, not by the step") == "memory-bounded-by-a-micro-batch-not-by-the-step"

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


def python_blocks(page, section: str) -> list[str]:
    """The ```python blocks of a page's section (up to the next heading of its level)."""
    text = page.read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start : end if end > 0 else None], re.S)


def test_the_readme_plugin_examples_run_as_written(tmp_path):
    """The README's "Use it in your own Lightning code" examples (DPO with a plain Trainer and TR-DPO's refresh; RLVR
    with a reward function of one's own), each run as written in a fresh process from an empty directory."""
    import os
    import subprocess
    import sys

    blocks = python_blocks(ROOT / "README.md", "Use it in your own Lightning code")
    assert len(blocks) == 2
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "WANDB_MODE": "offline"}
    for i, code in enumerate(blocks):
        d = tmp_path / f"example{i}"
        d.mkdir()
        code += "\nprint('STEP', trainer.global_step if 'trainer' in dir() else module.global_step)\n"
        r = subprocess.run([sys.executable, "-c", code], cwd=d, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.strip().splitlines()[-1] == ("STEP 10" if i == 0 else "STEP 4"), r.stdout[-500:]

"""The command line as users type it (subprocesses: each pays the ~6 s import, so only a few)."""

from __future__ import annotations

from tests.helpers import ROOT
from tests.helpers import run_cli as run


def test_help_lists_the_groups(tmp_path):
    r = run("--help", tmp=tmp_path)
    assert r.returncode == 0
    for group in ("algo", "data", "model", "logger", "reward"):
        names = ", ".join(sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml")))
        assert f"{group}: {names}" in r.stdout  # e.g. "algo: dpo, rlvr, sft, tr_dpo"


def test_typos_fail_at_once_naming_key_and_choices(tmp_path):
    r = run("algo=sftt", tmp=tmp_path)
    assert r.returncode != 0
    assert "Could not find 'algo/sftt'" in r.stderr and "Available options" in r.stderr and "sft" in r.stderr
    r = run("algo.lrr=1", tmp=tmp_path)
    assert r.returncode != 0 and "Could not override 'algo.lrr'" in r.stderr


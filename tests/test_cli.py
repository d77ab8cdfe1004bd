"""The command line as users type it (subprocesses: each pays the ~6 s import, so only a few)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PROJECT_ROOT": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "train.py"), *args, f"paths.log_dir={tmp}"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp, timeout=300)


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


def test_multirun_runs_one_job_per_value(tmp_path):
    r = run("-m", "algo.lr=1e-3,3e-4", "debug=fdr", tmp=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "#0 : algo.lr=0.001 debug=fdr" in r.stdout and "#1 : algo.lr=0.0003 debug=fdr" in r.stdout
    jobs = sorted(p.name for p in (tmp_path / "train" / "multiruns").glob("*/*") if p.is_dir())
    assert jobs == ["0", "1"]

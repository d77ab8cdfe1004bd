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



def test_a_run_shorter_than_one_val_interval_exits_0_and_prints_no_noise(tmp_path):
    """`trainer.max_steps=3` with validation every 250 steps: the final weights are validated once (best
    checkpoint, returned metric), rc = 0, and none of the known console noise is printed."""
    r = run("algo=sft", "trainer.max_steps=3", "data.source.n_train=64", "data.source.n_val=8", "data.source.n_test=8",
            "logger=wandb", tmp=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "Best checkpoint:" in out and "step000003.ckpt" in out
    for noise in ("LeafSpec", "litlogger", "anonymous setting", "overridden `transfer_batch_to_device`",
                  "Writing model shards", "does not have many workers"):
        assert noise not in out, f"console noise: {noise!r}"


def test_gpu_check_stops_loudly_without_cuda_and_composes_every_run():
    """bench/gpu_check.py is for GPU machines: here it exits non-zero saying why; --dry-run composes each run's
    config (a renamed key would fail it)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0 and "no CUDA device here" in r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run"], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("composed: ") == 7 and "composed: rlvr_vllm trainer=gpu" in r.stdout

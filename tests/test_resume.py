"""Exact resume for every algorithm: a run stopped by SIGTERM in the middle of an epoch, or killed
between checkpoints, and resumed from its checkpoint logs the same losses afterwards as a run that
was never interrupted (CPU, fixed seeds), and ends with the same weights."""

from __future__ import annotations

import os

import pytest

from tests.helpers import ALGORITHMS, SHORT, short_run
from tests.helpers.resume import PER_EPOCH, TOTAL, check_resume_exactly

# every algorithm (conf/algo/), each in the variant whose state is the largest (one resume per code path): SFT with
# LoRA adapters and their optimizer state; DPO as TR-DPO (its reference refreshed, the callback's counter: algo=dpo is
# the same module with less state); RLVR in micro-batches of 3 samples (groups of 4 split across them), and over
# multi-turn episodes (environments reset on each row, prompts re-rendered with the tool's schema); diffusion as flow
# matching (continuous logit-normal t, Heun samples, EMA)
VARIANTS = {
    "sft": (["algo=sft", "model.lora.r=4", "model.lora.dropout=0.0"], True),
    "rlvr": (SHORT["rlvr"] + ["algo.micro_batch_size=3"], True),
    "rlvr_env": (SHORT["rlvr"] + ["env=calculator", "env.max_tokens=12", "env.max_turns=2"], True),
    "ddpm": (SHORT["ddpm"] + ["algo.process.name=flow", "algo.t_sampling=logit_normal", "algo.val_sampler=heun",
                              "algo.val_steps=5"], False),
}
SUBSUMED = {"dpo": "tr_dpo"}  # the same module, whose tr_dpo case holds all of dpo's state and more
CASES = {algo: short_run(algo) for algo in ALGORITHMS if algo not in SUBSUMED} | VARIANTS


def _four_batches(cfg_factory, overrides, quick) -> list[str]:
    """The batch size that makes PER_EPOCH batches of this run's train split."""
    import hydra

    cfg = cfg_factory(*overrides, quick=quick)
    shared = {"tokenizer": hydra.utils.instantiate(cfg.model.tokenizer)} if "tokenizer" in cfg.model else {}
    dm = hydra.utils.instantiate(cfg.data, **shared)
    dm.setup("fit")
    n = len(dm.train_dataloader().dataset)
    assert n % PER_EPOCH == 0, f"{n} train rows do not make {PER_EPOCH} equal batches"
    return [f"data.batch_size={n // PER_EPOCH}"]


@pytest.mark.parametrize("algo", list(CASES))
def test_sigterm_mid_epoch_and_kill_between_checkpoints_resume_exactly(cfg_factory, tmp_path, algo):
    overrides, quick = CASES[algo]
    overrides = overrides + _four_batches(cfg_factory, overrides, quick)
    check_resume_exactly(cfg_factory, tmp_path, algo, overrides, quick, TOTAL, PER_EPOCH)


def test_ckpt_path_last_and_missing_checkpoint(cfg_factory, tmp_path):
    from genlight.utils import resolve_ckpt_path

    cfg = cfg_factory("ckpt_path=last")
    cfg.paths.log_dir = str(tmp_path / "logs")
    cfg.paths.output_dir = str(tmp_path / "logs" / "train" / "runs" / "now")  # this run's own dir is skipped
    with pytest.raises(FileNotFoundError, match="ckpt_path=last: no checkpoints/last.ckpt under"):
        resolve_ckpt_path(cfg)
    for i, run in enumerate(["a", "b"]):
        p = tmp_path / "logs" / "train" / "runs" / run / "checkpoints" / "last.ckpt"
        p.parent.mkdir(parents=True)
        p.write_bytes(b"x")
        os.utime(p, (1000 + i, 1000 + i))
    assert resolve_ckpt_path(cfg).endswith("runs/b/checkpoints/last.ckpt")
    cfg.ckpt_path = str(tmp_path / "nope.ckpt")
    with pytest.raises(FileNotFoundError, match="ckpt_path=.*nope.ckpt: no such checkpoint file"):
        resolve_ckpt_path(cfg)

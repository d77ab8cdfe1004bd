"""FSDP2 (`trainer=fsdp`: ModelParallelStrategy + fully_shard per block) on 2 CPU processes (gloo).

ModelParallelStrategy re-launches the script for its other rank, so these runs are `python train.py`
subprocesses; each is compared with a DDP run (`ddp_fork`, in-process) on identical work: both average
the gradients of the two ranks' halves, so losses and weights must agree step by step."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import ALGORITHMS, RLVR_RUN, is_lm, run_cli, short_run, train_with

COMMON = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true", "trainer.val_check_interval=4",
          "data.source.n_train=64", "data.source.n_val=16", "data.source.n_test=16", "data.batch_size=8",
          "logger=csv", "extras.print_config=false", "trainer.enable_progress_bar=false", "test=false"]
# every language-model algorithm (conf/algo/), with what its FSDP2 run needs beyond `algo=NAME` and the warm start
# off, plus a LoRA variant
EXTRA = {
    # the frozen reference is sharded too, and refreshed (TR-DPO) at steps 2, 4, 6; pairs packed as prompt trees
    # (the padded shared-prompt forward is the one RLVR uses below)
    "tr_dpo": ["callbacks.reference_refresh.alpha=0.5", "data.packing=true"],
    # the lagged generator is sharded too and refreshed shard to shard (generation_lag 3: steps 3, 6); the KL's
    # reference is sharded; the FSDP2 side trains in micro-batches of 3 samples (MICRO), the DDP side in one
    "rlvr": ["algo.beta=0.1"],
    # a sequence classifier: its score head joins the root unit, the export is AutoModelForSequenceClassification's
    "reward_model": ["algo.lr=1e-3"],
}
ALGOS = {algo: (short_run(algo)[0] if algo != "rlvr" else [o for o in RLVR_RUN if not o.startswith(
    ("test=", "trainer.val_check_interval", "data.batch_size"))]) + EXTRA.get(algo, [])
    for algo in ALGORITHMS if is_lm(algo)}
ALGOS["sft_lora"] = ["algo=sft", "model.lora.r=4", "model.lora.dropout=0.0", "algo.lr=1e-2"]
# RLVR over multi-turn episodes (env=): the sharded generator samples every turn, the tool turns are masked; with an
# off-policy correction, whose pi_old is recomputed by the sharded generator in the step's micro-batches
ALGOS["rlvr_env"] = ALGOS["rlvr"] + ["env=calculator", "env.max_tokens=12", "env.max_turns=2", "algo.is_correction=tis"]
MICRO = {"rlvr": ["algo.micro_batch_size=3"], "rlvr_env": ["algo.micro_batch_size=3"]}


def _fsdp(tmp: Path, name: str, *overrides: str) -> Path:
    """A `trainer=fsdp` run on 2 processes; returns its run directory."""
    r = run_cli(*ALGOS[name.split(":")[0]], "trainer=fsdp", *COMMON, *overrides, f"hydra.run.dir={tmp / name}", tmp=tmp)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return tmp / name


def _losses(run: Path) -> dict[int, float]:
    rows = csv.DictReader((run / "csv" / "version_0" / "metrics.csv").open())
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def _ddp(cfg_factory, tmp: Path, name: str, *overrides: str):
    cfg = cfg_factory(*ALGOS[name], "trainer=ddp", "trainer.strategy=ddp_fork", *COMMON, "trainer.log_every_n_steps=1",
                      *overrides)
    cfg.paths.output_dir = str(tmp / f"ddp-{name}")
    cfg.callbacks.hf_export.dirpath = str(tmp / f"ddp-{name}" / "hf")
    cfg.callbacks.model_checkpoint.dirpath = str(tmp / f"ddp-{name}" / "checkpoints")
    train_with(cfg)
    return tmp / f"ddp-{name}"


def _same_weights(a: Path, b: Path, atol: float = 1e-5) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=atol), f"{k} differs"


@pytest.mark.parametrize("name", list(ALGOS))
def test_fsdp2_matches_ddp_step_by_step_and_exports_one_hf_directory(cfg_factory, tmp_path, name):
    fsdp = _fsdp(tmp_path, name, "trainer.max_steps=6", "trainer.log_every_n_steps=1", *MICRO.get(name, []))
    ddp = _ddp(cfg_factory, tmp_path, name, "trainer.max_steps=6")
    got, want = _losses(fsdp), _losses(ddp)
    assert sorted(got) == sorted(want) and len(got) == 6
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-4), f"{name}: loss differs at step {step}"
    # the export is one ordinary HF directory, gathered from the shards, with the DDP run's weights
    _same_weights(fsdp / "hf", ddp / "hf")
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    (AutoModelForSequenceClassification if name == "reward_model" else AutoModelForCausalLM).from_pretrained(
        fsdp / "hf", local_files_only=True)
    if name == "sft_lora":
        assert (fsdp / "hf" / "adapter" / "adapter_config.json").is_file()
    checkpoint = fsdp / "checkpoints" / "last.ckpt"
    assert checkpoint.is_dir() and (checkpoint / ".metadata").is_file(), "checkpoints are sharded directories"


@pytest.mark.parametrize("arch", ["qwen2", "gpt2", "llama"])
def test_fsdp2_on_qwen2_and_gpt2_matches_ddp(cfg_factory, tmp_path, arch):
    """The blocks to shard come from `_no_split_modules` (Qwen2DecoderLayer, GPT2Block): no class names in YAML.
    This Llama has an untied LM head, sharded in the root unit with the stack (`head_logps` reads its weight)."""
    from tests.helpers.checkpoints import tiny_checkpoint

    ckpt = tiny_checkpoint(arch, tmp_path / f"{arch}-init")
    model = ["model=hf", f"model.pretrained={ckpt}", "trainer.max_steps=4", "trainer.log_every_n_steps=1"]
    fsdp = _fsdp(tmp_path, "sft", *model)
    ddp = _ddp(cfg_factory, tmp_path, "sft", *model)
    got, want = _losses(fsdp), _losses(ddp)
    assert sorted(got) == sorted(want) and len(got) == 4
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-4), f"{arch}: loss differs at step {step}"
    _same_weights(fsdp / "hf", ddp / "hf")


def test_fsdp2_sharded_checkpoint_resumes_exactly(tmp_path):
    """Resume an 8-step run from its sharded step-4 checkpoint: the same losses and final weights as 8 straight."""
    straight = _fsdp(tmp_path, "sft:straight", "trainer.max_steps=8", "trainer.log_every_n_steps=1",
                     "callbacks.model_checkpoint.save_top_k=-1")
    step4 = straight / "checkpoints" / "step000004.ckpt"
    assert step4.is_dir()
    resumed = _fsdp(tmp_path, "sft:resumed", "trainer.max_steps=8", "trainer.log_every_n_steps=1", f"ckpt_path={step4}")
    want, got = _losses(straight), _losses(resumed)
    assert sorted(got) == [4, 5, 6, 7], "the resumed run continues after step 4"
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-5), f"loss differs at step {step}"
    _same_weights(resumed / "hf", straight / "hf", atol=1e-6)

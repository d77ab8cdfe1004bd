"""DDP on 2 CPU processes (gloo, ddp_fork): the TR-DPO reference is identical on every rank; RLVR's
batch-level advantages over both ranks equal the single-process computation on the whole batch."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from tests.helpers import RLVR_RUN as RUN
from tests.helpers import train_with


class RefSpread(L.Callback):
    """After each step: the spread across ranks of a checksum of the reference and of the policy."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        ref = torch.stack([p.double().sum() for p in pl_module.ref_model.parameters()]).sum()
        pol = torch.stack([p.double().sum() for p in pl_module.model.parameters()]).sum()
        both = pl_module.all_gather(torch.stack([ref, pol]))  # (world, 2)
        spread = (both.max(0).values - both.min(0).values).max()
        pl_module.log("ddp/world", float(both.size(0)), batch_size=1)
        pl_module.log("ddp/checksum_spread", spread.float(), batch_size=1, reduce_fx="max")
        pl_module.log("ddp/ref_checksum", ref.float(), batch_size=1)


def test_tr_dpo_reference_identical_across_ranks(cfg_factory):
    cfg = cfg_factory(
        "algo=tr_dpo", "callbacks.reference_refresh.tau=2", "warm_start.max_steps=0", "test=false",
        "trainer.max_steps=6", "trainer.val_check_interval=3", "trainer=ddp", "trainer.strategy=ddp_fork",
        "data.batch_size=8",
    )
    metrics, objs = train_with(cfg, RefSpread())
    assert metrics["ddp/world"] == 2
    assert metrics["ddp/checksum_spread"] == 0.0, "ranks disagree on the policy or the reference"
    assert metrics["ref/refreshes"] == 2  # at the start of steps 3 and 5 (after steps 2 and 4; 6 is the last)


class AdvantageCheck(L.Callback):
    """After each step: the advantages both ranks used, side by side, against a single-process
    computation on the whole (gathered) batch; and whether the ranks agree on the retired set."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        last = pl_module.last_batch
        local = pl_module.all_gather(last["adv"]).flatten(0, 1)  # (world * B, G), rank order
        # by hand on the whole (gathered) batch, as one process would: A = r - mean_group(r), divided by the std of
        # the kept groups' advantages over the batch, 0 for the dropped groups
        r, keep = last["rewards_all"], last["keep_all"]
        centred = r - r.mean(-1, keepdim=True)
        single = centred / (centred[keep].std() + 1e-6) * keep[:, None] if keep.sum() > 0 else centred * 0
        n = pl_module.all_gather(torch.tensor(float(len(pl_module.retired))))
        pol = pl_module.all_gather(torch.stack([p.double().sum() for p in pl_module.model.parameters()]).sum())
        worst = {  # the maximum over all steps of the epoch
            "ddp/world": float(trainer.world_size),
            "ddp/adv_error": (local - single).abs().max(),
            "ddp/kept_groups": last["keep_all"].float().sum(),
            "ddp/retired_spread": n.max() - n.min(),
            "ddp/policy_spread": (pol.max() - pol.min()).float(),
        }
        for k, v in worst.items():
            pl_module.log(k, v, batch_size=1, reduce_fx="max", on_step=False, on_epoch=True)


@pytest.mark.parametrize("episodes", [[], ["env=calculator", "env.max_tokens=12", "env.max_turns=2"]],
                         ids=["single_turn", "multi_turn"])
def test_rlvr_batch_normalisation_across_ranks_equals_single_process(cfg_factory, episodes):
    """Also over multi-turn episodes (env=): each rank resets its own environments and re-renders its prompts."""
    cfg = cfg_factory(*RUN, "trainer.max_steps=4", "trainer=ddp", "trainer.strategy=ddp_fork",
                      "data.batch_size=2", "data.source.n_train=32", *episodes)
    metrics, _ = train_with(cfg, AdvantageCheck())
    assert metrics["ddp/world"] == 2
    assert metrics["ddp/kept_groups"] >= 1, "no group with a learning signal: the check is vacuous"
    assert metrics["ddp/adv_error"] < 1e-6
    assert metrics["ddp/retired_spread"] == 0 and metrics["ddp/policy_spread"] == 0


class ComputeCheck(L.Callback):
    """After each step: this rank's tokens counted apart from the module (the prompt tokens of its rows, once per
    prompt; each completion's tokens up to and with its first <eos>, or all max_new_tokens), summed over both ranks by
    hand into 8 N per token (2 N sampling + 6 N training), against each rank's train/compute_flops."""

    def __init__(self, rolls: list):
        self.rolls, self.total = rolls, 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        rows = trainer.datamodule.examples["train"]
        eos, limit = pl_module.tokenizer.eos_token_id, pl_module.hparams.max_new_tokens
        prompt = sum(len(rows[i]["prompt_ids"]) for i in batch["index"].tolist())
        generated = sum(ids.index(eos) + 1 if eos in ids[:limit] else limit
                        for ids in self.rolls[-1].completion_ids.tolist())
        both = pl_module.all_gather(torch.tensor([prompt, generated], dtype=torch.float64))  # (world, 2)
        self.total += 8 * pl_module.model.num_parameters() * float(both.sum())
        logged = float(trainer.callback_metrics["train/compute_flops"])
        flops = pl_module.all_gather(torch.tensor([logged], dtype=torch.float64))  # each rank's value
        worst = {
            "ddp/world": float(trainer.world_size),
            "ddp/generated_spread": (both[:, 1].max() - both[:, 1].min()).float(),  # the ranks' lengths differ
            "ddp/flops_error": ((flops - self.total).abs().max() / self.total).float(),
            "ddp/flops_spread": (flops.max() - flops.min()).float(),
        }
        for k, v in worst.items():
            pl_module.log(k, v, batch_size=1, reduce_fx="max", on_step=False, on_epoch=True)


def test_rlvr_compute_flops_sum_the_tokens_of_every_rank(cfg_factory, monkeypatch):
    """train/compute_flops (the ScaleRL x-axis) under DDP counts the tokens of both ranks, not this rank's x 2: each
    rank holds the hand sum over both, and the same value, when their completion lengths differ."""
    from genlight.models.rollout import HFRollout

    rolls, generate = [], HFRollout.generate
    monkeypatch.setattr(HFRollout, "generate", lambda self, *a, **k: rolls.append(generate(self, *a, **k)) or rolls[-1])
    cfg = cfg_factory(*RUN, "trainer.max_steps=3", "trainer=ddp", "trainer.strategy=ddp_fork", "data.batch_size=2",
                      "data.source.n_train=32", "trainer.val_check_interval=null", "+trainer.limit_val_batches=0",
                      "trainer.num_sanity_val_steps=0")
    metrics, _ = train_with(cfg, ComputeCheck(rolls))
    assert metrics["ddp/world"] == 2
    assert metrics["ddp/generated_spread"] > 0, "both ranks generated as many tokens at every step: the check is vacuous"
    assert metrics["ddp/flops_error"] < 1e-6
    assert metrics["ddp/flops_spread"] == 0


class StepMetricsCheck(L.Callback):
    """After each step: every train/* metric on both ranks side by side (their largest spread), and the per-sample
    ones by hand over both ranks' samples: the rewards and passes of the whole batch (`last_batch`, gathered; the
    parity verifier pays 1 to a pass), each rank's completions as the engine returned them, each rank's loss."""

    def __init__(self, rolls: list):
        self.rolls = rolls

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        got = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/") and v.numel() == 1}
        keys = sorted(got)
        both = pl_module.all_gather(torch.tensor([got[k] for k in keys], dtype=torch.float64))  # (world, K)
        roll = self.rolls[-1]
        mine = torch.tensor([float(roll.completion_mask.sum()), float(roll.truncated.sum()), float(roll.truncated.numel()),
                             float(outputs["loss"] if isinstance(outputs, dict) else outputs)], dtype=torch.float64)
        tokens, cut, samples, _ = pl_module.all_gather(mine).sum(0).tolist()
        losses = pl_module.all_gather(mine[3:])
        r = pl_module.last_batch["rewards_all"].double()
        want = {"train/reward/mean": r.mean(), "train/reward/std": r.std(), "train/pass_rate": (r >= 1).double().mean(),
                "train/completion_length": tokens / samples, "train/truncation_rate": cut / samples,
                "train/loss": losses.mean()}
        error = max(abs(got[k] - float(v)) / max(abs(float(v)), 1e-6) for k, v in want.items())
        spread = (both.max(0).values - both.min(0).values).abs().max()
        pl_module.log("ddp/world", float(trainer.world_size), batch_size=1)
        for k, v in {"ddp/metric_spread": spread, "ddp/per_sample_error": error}.items():
            pl_module.log(k, torch.as_tensor(v).float(), batch_size=1, reduce_fx="max", on_step=False, on_epoch=True)


def test_rlvr_step_metrics_are_over_both_ranks(cfg_factory, monkeypatch):
    """train/* metrics under DDP: rank 0 logged its own half of the step (its rewards' mean, its tokens' entropy, its
    share of the loss); they are the whole step's now: the same on both ranks, and by hand over both ranks' samples."""
    from genlight.models.rollout import HFRollout

    rolls, generate = [], HFRollout.generate
    monkeypatch.setattr(HFRollout, "generate", lambda self, *a, **k: rolls.append(generate(self, *a, **k)) or rolls[-1])
    cfg = cfg_factory(*RUN, "trainer.max_steps=3", "trainer=ddp", "trainer.strategy=ddp_fork", "data.batch_size=2",
                      "data.source.n_train=32", "trainer.val_check_interval=null", "+trainer.limit_val_batches=0",
                      "trainer.num_sanity_val_steps=0", "algo.beta=0.1", "algo.recompute_gen_logps=true")
    metrics, _ = train_with(cfg, StepMetricsCheck(rolls))
    assert metrics["ddp/world"] == 2
    assert metrics["ddp/per_sample_error"] < 1e-5
    assert metrics["ddp/metric_spread"] < 1e-6, "the ranks log different train/* values"


def test_sft_under_trainer_ddp_keeps_ranks_in_step_and_syncs_metrics(cfg_factory):
    """trainer=ddp (2 CPU processes, gloo): each rank sees its own shard of the data, the policies
    stay identical, and val/exact_match is computed over both shards (the metric sums counts)."""

    class Check(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            idx = pl_module.all_gather(batch["index"])  # (world, B)
            pl_module.log("ddp/shared_examples", float(len(set(idx[0].tolist()) & set(idx[1].tolist()))),
                          batch_size=1, reduce_fx="max", on_step=False, on_epoch=True)

        def on_validation_epoch_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                m = pl_module.val_exact_match
                with m.sync_context():  # what val/exact_match is computed from: both ranks' counts
                    total = m.total.clone()
                pl_module.log("ddp/val_total", total.float(), batch_size=1)

    cfg = cfg_factory("algo=sft", "trainer=ddp", "trainer.strategy=ddp_fork", "trainer.max_steps=4",
                      "trainer.val_check_interval=2", "data.batch_size=8", "data.eval_batch_size=4", "test=false")
    metrics, _ = train_with(cfg, Check(), RefSpreadPolicyOnly())
    assert metrics["ddp/world"] == 2 and metrics["ddp/checksum_spread"] == 0.0
    assert metrics["ddp/shared_examples"] == 0, "both ranks trained on the same examples"
    assert metrics["ddp/val_total"] == 16, "val/exact_match must count the val examples of both ranks"


class RefSpreadPolicyOnly(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        pol = pl_module.all_gather(torch.stack([p.double().sum() for p in pl_module.model.parameters()]).sum())
        pl_module.log("ddp/world", float(pol.numel()), batch_size=1)
        pl_module.log("ddp/checksum_spread", (pol.max() - pol.min()).float(), batch_size=1, reduce_fx="max")


def test_ddp_fork_fit_and_test_reach_one_csv_file_and_one_wandb_run(cfg_factory, tmp_path):
    """With ddp_fork, fit and test run in separately forked workers: both phases' metrics land in one
    metrics.csv, and in one W&B run id (one offline directory per phase, each finished), for DDPM too."""
    import csv

    from genlight.pipeline import train
    from tests.helpers import DQUICK
    from tests.helpers import leet as _leet

    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.strategy=ddp_fork", "trainer.max_steps=4",
           "trainer.val_check_interval=2", "data=toy2d", "data.n_train=2048", "data.n_val=100", "data.n_test=100",
           "algo.val_num_samples=50", "algo.test_num_samples=50"]
    metrics, _ = train(cfg_factory(*[o for o in DQUICK if o != "logger=none"], *ddp, "logger=[csv,wandb]",
                                   quick=False))
    assert {"val/energy_distance", "test/energy_distance"} <= set(metrics)
    (path,) = list((tmp_path / "csv").glob("version_*/metrics.csv"))
    rows = list(csv.DictReader(path.open()))
    assert any(r["train/loss"] for r in rows) and any(r["test/loss"] for r in rows)
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({r.name.rsplit("-", 1)[1] for r in runs}) == 1, "fit and test share one run id"
    summaries = [_leet(r, summary=True) for r in runs]
    assert all(s["state"] == "finished" for s in summaries)
    assert "train/loss" in summaries[0]["summary"] and "test/loss" in summaries[1]["summary"]

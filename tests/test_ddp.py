"""DDP on 2 CPU processes (gloo, ddp_fork): the TR-DPO reference is identical on every rank."""

from __future__ import annotations

import lightning as L
import torch


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
    import train as train_mod

    cfg = cfg_factory(
        "algo=tr_dpo", "callbacks.reference_refresh.tau=2", "warm_start.steps=0", "test=false",
        "trainer.max_steps=6", "trainer.val_check_interval=3", "+trainer.strategy=ddp_fork", "trainer.devices=2",
        "data.batch_size=8",
    )
    original = train_mod.instantiate_callbacks
    train_mod.instantiate_callbacks = lambda *a, **k: original(*a, **k) + [RefSpread()]
    try:
        metrics, objs = train_mod.train(cfg)
    finally:
        train_mod.instantiate_callbacks = original
    assert metrics["ddp/world"] == 2
    assert metrics["ddp/checksum_spread"] == 0.0, "ranks disagree on the policy or the reference"
    assert metrics["ref/refreshes"] == 3

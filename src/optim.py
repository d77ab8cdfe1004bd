"""The optimizer every algorithm here trains with: AdamW, linear warm-up, cosine decay."""

from __future__ import annotations

import math

import lightning as L
import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup


def _can_fuse(params: list[torch.Tensor]) -> bool:
    """torch's fused AdamW takes plain float tensors on CPU or CUDA (not sharded DTensors)."""
    return bool(params) and all(
        type(p) in (torch.Tensor, torch.nn.Parameter) and p.device.type in ("cpu", "cuda") and p.is_floating_point()
        for p in params
    )


def adamw_cosine(module: L.LightningModule, groups: list[dict], lr: float, betas, warmup_steps: int,
                 min_lr_ratio: float) -> dict:
    """Fused AdamW over parameter groups, with linear warm-up then cosine decay to min_lr_ratio * lr over
    the run, stepped per optimizer step (what every algorithm here trains with)."""
    params = [p for g in groups for p in g["params"]]
    # Lightning's mixed-precision plugin refuses gradient clipping with a fused optimizer (it would unscale
    # internally): fused AdamW only at full precision
    mixed = "mixed" in str(module.trainer.precision)
    opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=(_can_fuse(params) and not mixed) or None)
    est = module.trainer.estimated_stepping_batches  # inf when only trainer.max_time bounds the run
    total = max(int(est), 1) if math.isfinite(est) else 10**9
    sched = get_cosine_with_min_lr_schedule_with_warmup(
        opt, num_warmup_steps=min(warmup_steps, total), num_training_steps=total, min_lr_rate=min_lr_ratio
    )
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

"""TRL's own GRPO loss on given tensors, as a reference the tests compare ours with."""

from __future__ import annotations

import collections
import types

import torch


def trl_grpo_loss(logp, logp_gen, adv, mask, *, loss_type: str = "grpo", level: str = "token", lo: float = 0.2,
                  hi: float = 0.2, max_completion_length: int | None = None):
    """TRL 1.16 GRPOTrainer._compute_loss itself (beta 0, no off-policy mask) on (N, T) log-probs, through a stand-in
    for the trainer's state it reads: `level` its importance_sampling_level (sequence: GSPO as TRL documents it),
    `max_completion_length` what loss_type="dr_grpo" divides by."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    n, t = logp.shape
    fake = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=0.0,
        loss_type=loss_type, epsilon_low=lo, epsilon_high=hi, args=types.SimpleNamespace(delta=None),
        use_vllm=False, model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        max_completion_length=max_completion_length, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
        accelerator=types.SimpleNamespace(gather=lambda x: x, reduce=lambda x, reduction: x))
    inputs = {"prompt_ids": torch.zeros(n, 1, dtype=torch.long), "prompt_mask": torch.ones(n, 1, dtype=torch.long),
              "completion_ids": torch.zeros(n, t, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": adv, "old_per_token_logps": logp_gen}
    return GRPOTrainer._compute_loss(fake, None, inputs)

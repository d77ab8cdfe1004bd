"""Advantages of RL with verifiable rewards, from the G rewards of each prompt's group (ScaleRL, Khatri et al. 2025;
GRPO, Shao et al. 2024), and the rewards they start from:

    A_i = r_i - mean_group(r)                  the group-mean baseline
    A_i^norm = A_i / std_batch(A)              `batch`: over the kept groups of the whole batch (ScaleRL)
             = A_i / std_group(r)              `group`: each group's own (GRPO)
    r_i <- r_i - beta sum_t log pi_gen(y_t) / pi_ref(y_t)    `kl_in=reward` (k1 in the reward, PPO-RLHF)
    r_i <- algo.truncated_reward               a completion cut at max_new_tokens

A group whose rewards are all equal (`zero_variance`) carries no learning signal. Pure tensor functions: no Lightning.
"""

from __future__ import annotations

import torch

NORMALISATIONS = ("batch", "group", "none")
STD_EPS = 1e-6


def zero_variance(rewards: torch.Tensor) -> torch.Tensor:
    """(B,) True where all G rewards of a prompt are equal (no learning signal)."""
    return rewards.amax(-1) == rewards.amin(-1)


def group_advantages(rewards: torch.Tensor, norm: str = "batch", keep: torch.Tensor | None = None) -> torch.Tensor:
    """A_i = r_i - mean_group(r), normalised by the std over the batch (`batch`, ScaleRL), by each
    group's std (`group`, GRPO) or not at all; groups with keep = False get A = 0.

    rewards: (B, G). The batch std is taken over the kept groups' advantages (the batch that
    enters the loss); stds are unbiased (Bessel), as torch.std.
    """
    if norm not in NORMALISATIONS:
        raise ValueError(f"algo.adv_norm={norm!r}: must be one of {list(NORMALISATIONS)}")
    keep = torch.ones(rewards.size(0), dtype=torch.bool, device=rewards.device) if keep is None else keep
    adv = rewards - rewards.mean(-1, keepdim=True)
    if norm == "batch":
        kept = adv[keep]
        std = kept.std() if kept.numel() > 1 else adv.new_tensor(1.0)
        adv = adv / (std + STD_EPS)
    elif norm == "group":
        adv = adv / (rewards.std(-1, keepdim=True) + STD_EPS)
    return adv * keep.unsqueeze(-1)


def kl_penalised_rewards(rewards: torch.Tensor, logp_gen: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                         beta: float) -> torch.Tensor:
    """`kl_in=reward`: r_i - beta sum_t log pi_gen(y_t) / pi_ref(y_t) over each sample's completion tokens (k1,
    with the sampler's log-probs: fixed at sampling, as PPO-RLHF's). rewards (B, G); the others (B, G, T)."""
    return rewards - beta * ((logp_gen - ref_logp) * mask).sum(-1)


def truncation_rewards(r: torch.Tensor, truncated: torch.Tensor, value: float | str | None,
                       floor: torch.Tensor | None = None) -> torch.Tensor:
    """Rewards with completions cut at max_new_tokens set to `algo.truncated_reward`: a number (in the reward's own
    units: a reward model's raw score, applied before whitening by `RewardModel.score_batch`), `min` (`floor`: the
    lowest reward of the step, so that running out of tokens never pays), or None (scored as they are)."""
    if value is None:
        return r
    fill = floor if value == "min" else torch.as_tensor(float(value), dtype=r.dtype, device=r.device)
    return torch.where(truncated, fill.to(r.dtype), r)

"""Advantages of RL with verifiable rewards: the estimators users pick by name (`algo.advantage`), each one function
of one signature, from each prompt's group of G rewards, and the rewards they start from.

    scalerl       A_i = (r_i - mean_group(r)) / std_batch(A)      group-mean baseline, the std over the kept groups'
                                                                  advantages of the whole batch (ScaleRL, Khatri et
                                                                  al. 2025: batch-level normalisation)
    grpo          A_i = (r_i - mean_group(r)) / std_group(r)      each group's own std (GRPO, Shao et al. 2024; TRL's
                                                                  scale_rewards="group")
    dr_grpo       A_i = r_i - mean_group(r)                       no std: it weighs groups by how hard their prompt is
                                                                  (Dr. GRPO, Liu et al. 2025; pair it with
                                                                  `algo.loss_agg=constant`, its constant normaliser)
    rloo          A_i = r_i - 1 / (G - 1) sum_{j != i} r_j        the leave-one-out baseline, unbiased: the baseline
                      = G / (G - 1) (r_i - mean_group(r))         does not depend on y_i (Ahmadian et al. 2024;
                                                                  Kool et al. 2019; TRL's RLOOTrainer)
    reinforce_pp  A_i = (r_i - mu) / sigma                        REINFORCE++ (Hu et al. 2025): no group
                                                                  baseline; mu, sigma the mean and std over the batch
    reinforce_pp_baseline  A_i = r_i - mean_group(r), then (A_i - mu) / sigma   REINFORCE++-baseline (the same
                                                                  paper, for reasoning: the group mean, then the batch's
                                                                  normalisation)

REINFORCE++'s mu and sigma are over the batch's completion tokens, every token carrying its sample's return (as its
authors' OpenRLHF computes them: `masked_mean` and the biased variance over `action_mask`, 1e-8 under the root), so a
long completion weighs more in them than a short one. Its returns are per token, r - beta sum_{i >= t} KL_i; here
rewards are per sample, and `kl_in=reward` folds the whole completion's k1 into its reward (the token-0 return).

Every estimator sees only the kept groups (`keep`, the zero-variance filter's) in its batch statistics, and gives
the dropped groups A = 0. A new estimator is one function registered with `@register_advantage("name")` taking
(rewards (B, G), keep (B,), lengths (B, G)) and returning (B, G); `algo.advantage=name` then trains with it.

    r_i <- r_i - beta sum_t log pi_gen(y_t) / pi_ref(y_t)    `kl_in=reward` (k1 in the reward, PPO-RLHF)
    r_i <- algo.truncated_reward               a completion cut at max_new_tokens

A group whose rewards are all equal (`zero_variance`) carries no learning signal for the group-baseline estimators.
Pure tensor functions: no Lightning.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from genlight.rl.registry import Registry

STD_EPS = 1e-6

Estimator = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ADVANTAGES = Registry("algo.advantage", "genlight.rl.advantages.register_advantage")


def register_advantage(name: str) -> Callable[[Estimator], Estimator]:
    """Register an advantage estimator under `name` (`algo.advantage=name`): fn(rewards (B, G), keep (B,) bool,
    lengths (B, G) completion tokens) -> advantages (B, G); `compute_advantages` zeroes the groups keep drops."""
    return ADVANTAGES.register(name)


def check_advantage(name: str) -> Estimator:
    """The estimator registered as `name`, or an error naming the key and listing the registered ones."""
    return ADVANTAGES.get_fn(name)


def compute_advantages(name: str, rewards: torch.Tensor, keep: torch.Tensor | None = None,
               lengths: torch.Tensor | None = None) -> torch.Tensor:
    """A = `algo.advantage`'s estimator on rewards (B, G); keep (B,) defaults to all groups, lengths (B, G) to 1."""
    keep = torch.ones(rewards.size(0), dtype=torch.bool, device=rewards.device) if keep is None else keep.bool()
    lengths = torch.ones_like(rewards) if lengths is None else lengths.to(rewards.dtype)
    return check_advantage(name)(rewards, keep, lengths) * keep.unsqueeze(-1)


def centred(rewards: torch.Tensor) -> torch.Tensor:
    """r_i - mean_group(r)."""
    return rewards - rewards.mean(-1, keepdim=True)


@register_advantage("scalerl")
def scalerl(rewards: torch.Tensor, keep: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(r_i - mean_group(r)) / std_batch(A): the std (Bessel, as torch.std) of the kept groups' advantages."""
    adv = centred(rewards)
    kept = adv[keep]
    std = kept.std() if kept.numel() > 1 else adv.new_tensor(1.0)
    return adv / (std + STD_EPS)


@register_advantage("grpo")
def grpo(rewards: torch.Tensor, keep: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(r_i - mean_group(r)) / std_group(r) (Bessel, as torch.std and TRL)."""
    return centred(rewards) / (rewards.std(-1, keepdim=True) + STD_EPS)


@register_advantage("dr_grpo")
def dr_grpo(rewards: torch.Tensor, keep: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """r_i - mean_group(r): no std."""
    return centred(rewards)


@register_advantage("rloo")
def rloo(rewards: torch.Tensor, keep: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """r_i - the mean of the group's other G - 1 rewards."""
    g = rewards.size(-1)
    return rewards - (rewards.sum(-1, keepdim=True) - rewards) / (g - 1)


def whitened(adv: torch.Tensor, keep: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(A - mu) / sqrt(var + ...) with mu and the biased var over the kept groups' completion tokens (each sample's A
    counted once per token: OpenRLHF's masked mean and variance), the variance floored at 1e-8 as there."""
    w = lengths * keep.unsqueeze(-1)
    n = w.sum()
    if n <= 0:
        return adv
    mu = (adv * w).sum() / n
    var = ((adv - mu) ** 2 * w).sum() / n
    return (adv - mu) * var.clamp(min=1e-8).rsqrt()


@register_advantage("reinforce_pp")
def reinforce_pp(rewards: torch.Tensor, keep: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """REINFORCE++: the rewards whitened over the batch's tokens, no group baseline."""
    return whitened(rewards, keep, lengths)


@register_advantage("reinforce_pp_baseline")
def reinforce_pp_baseline(rewards: torch.Tensor, keep: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """REINFORCE++-baseline: the group mean subtracted, then whitened over the batch's tokens."""
    return whitened(centred(rewards), keep, lengths)


def zero_variance(rewards: torch.Tensor) -> torch.Tensor:
    """(B,) True where all G rewards of a prompt are equal (no learning signal)."""
    return rewards.amax(-1) == rewards.amin(-1)


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

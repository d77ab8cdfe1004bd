"""The policy losses of RL with verifiable rewards and their pieces (`loss_type`, `loss_agg`, the KL to a reference),
as pure tensor functions (no Lightning): what a reader checks against the papers. Each loss is one function registered
by name (`@register_policy_loss`, `algo.loss_type=name`); its paper's advantage, aggregation and clip range are a
preset in conf/loss/ (`loss=grpo`), not here.

    cispo  sg(min(rho, eps)) A log pi_train                 (MiniMax-M1's CISPO, ScaleRL's choice)
    grpo   min(rho A, clip(rho, 1 - e_lo, 1 + e_hi) A)      PPO's clipped ratio (Shao et al. 2024, DeepSeekMath)
    dapo   the same clipped ratio; its preset sets clip-higher e_hi = 0.28 (Yu et al. 2025)
    gspo   min(s A, clip(s, 1 - 3e-4, 1 + 4e-4) A) with one ratio per sequence, the geometric mean of its tokens'
           s_i = exp(1/|y_i| sum_t log rho_{i,t})          (Zheng et al. 2025, GSPO; TRL's importance_sampling_level=
           "sequence"), group advantages, sequence-mean aggregation
    rho = pi_train(y_t) / pi_gen(y_t), the importance weight of samples drawn from pi_gen

Aggregation (`loss_agg`): `prompt` 1 / sum_g |y_g| per prompt then the mean over prompts (ScaleRL), `token` every token
alike (DAPO), `sequence` the mean per sample then over samples (GRPO), `constant` each sample's sum over the generation
budget then the mean over samples (Dr. GRPO). With beta > 0 and `kl_in=loss`, the
importance-weighted KL term beta sg(min(rho, eps)) k(d_t), d_t = log pi(y_t) / pi_ref(y_t) (`kl_term`).

Off-policy corrections for the sampler-trainer mismatch (`is_correction`, `is_weights`), verl's decoupled
"rollout correction" (Liu, Li et al. 2025, "When Speed Kills Stability") and TRL's `vllm_importance_sampling_mode`:
with pi_old the generator's weights run by the trainer's kernels (recomputed) and pi_rollout the engine's log-probs,
each token's policy-gradient term is multiplied by a weight of q = pi_old / pi_rollout (per token, or per sequence: the
product over its tokens), no gradient, and the KL term is added after, unweighted by it (TRL's place: a token the
correction masks keeps its pull to pi_ref); the policy ratio rho becomes pi_train / pi_old:
    tis     min(q, C_high) (and max(., C_low) if set)   truncated IS (verl rollout_is, TRL *_truncate)
    mis     q 1[C_low <= q <= C_high], else 0         masked IS (TRL *_mask; verl's rejection sampling keeps 1, not q)
    icepop  mis per token with IcePop's band [0.5, 5]  (Ling team 2025, Ring-1T's IcePop)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from genlight.rl.registry import Registry

KL_ESTIMATORS = ("k1", "k2", "k3")
KL_IN = ("reward", "loss")
AGGREGATIONS = ("prompt", "token", "sequence", "constant")


IS_CORRECTIONS = ("tis", "mis", "icepop")
IS_LEVELS = ("token", "sequence")
# (C_low, C_high) as each source sets them: verl's rollout_is_threshold 2.0 (rejection: the reciprocal below), IcePop's
# [0.5, 5]; `algo.is_cap_low` / `algo.is_cap_high` override
IS_PRESETS = {"tis": (None, 2.0), "mis": (0.5, 2.0), "icepop": (0.5, 5.0)}


def check_is_correction(correction: str | None, level: str, c_low: float | None, c_high: float | None
                        ) -> tuple[float | None, float | None]:
    """Validate `algo.is_correction`, `algo.is_level` and the bounds (naming the key at fault); return the bounds with
    the correction's own defaults filled in (null correction: (None, None))."""
    if correction is None:
        return None, None
    if correction not in IS_CORRECTIONS:
        raise ValueError(f"algo.is_correction={correction!r}: must be one of {list(IS_CORRECTIONS)} or null")
    if level not in IS_LEVELS:
        raise ValueError(f"algo.is_level={level!r}: must be one of {list(IS_LEVELS)}")
    if correction == "icepop" and level != "token":
        raise ValueError("algo.is_correction=icepop masks tokens (IcePop is token-level): use algo.is_level=token, "
                         "or algo.is_correction=mis for sequences")
    low = c_low if c_low is not None else IS_PRESETS[correction][0]
    high = c_high if c_high is not None else IS_PRESETS[correction][1]
    if high <= 0 or (low is not None and not 0 <= low < high):
        raise ValueError(f"algo.is_cap_low={low}, algo.is_cap_high={high}: need 0 <= is_cap_low < is_cap_high")
    return low, high


def is_weights(logp_old: torch.Tensor, logp_rollout: torch.Tensor, mask: torch.Tensor, correction: str | None,
               level: str = "token", c_low: float | None = None, c_high: float | None = 2.0
               ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """Each completion token's correction weight (N, T), 0 off the `mask`, from q = pi_old / pi_rollout (`level`
    token: its own; sequence: exp of the sum of log q over its sequence's tokens, broadcast), and its statistics:

    sampling/importance_sampling_ratio/*  TRL's: min / mean / max of the weights applied (after truncation or masking:
                                          a masked token counts as 0) over the completion tokens, or one per sequence
    sampling/raw_importance_ratio/*       q itself, before truncation or masking, over the same units
    sampling/sampling_logp_difference/*   TRL's: |log pi_old - log pi_rollout| over the tokens (the engine's mismatch)
    sampling/frac_masked, frac_truncated  the share of tokens (sequences) masked (mis, icepop) or truncated (tis)

    `correction` None: no weight (None) and no `importance_sampling_ratio/*` (nothing is applied), the rest alone (the
    recompute without a correction)."""
    m = mask.bool()
    d = (logp_old - logp_rollout).masked_fill(~m, 0.0)
    log_q = d.sum(-1, keepdim=True).expand_as(d) if level == "sequence" else d
    q = torch.exp(log_q.clamp(max=20.0))  # verl's guard: a sequence's product can overflow
    out = torch.zeros_like(m)  # outside [c_low, c_high], where a bound is set
    if c_low is not None:
        out |= q < c_low
    if c_high is not None:
        out |= q > c_high
    masked, truncated, w = torch.zeros_like(m), torch.zeros_like(m), None
    if correction == "tis":  # TRL's *_truncate also raises q to a lower bound when one is given
        w, truncated = q.clamp(min=c_low, max=c_high).masked_fill(~m, 0.0), out
    elif correction is not None:
        w, masked = q.masked_fill(out | ~m, 0.0), out
    # the units: each completion token, or each sequence once (its first column: the sequence's q is broadcast)
    unit = m if level == "token" else m.any(-1, keepdim=True) & (torch.arange(m.size(-1), device=m.device) == 0)
    qs = q[unit]
    empty = qs.numel() == 0
    stats = {
        "sampling/raw_importance_ratio/mean": q.new_tensor(1.0) if empty else qs.mean(),
        "sampling/raw_importance_ratio/min": q.new_tensor(1.0) if empty else qs.min(),
        "sampling/raw_importance_ratio/max": q.new_tensor(1.0) if empty else qs.max(),
        "sampling/sampling_logp_difference/mean": d[m].abs().mean() if m.any() else q.new_tensor(0.0),
        "sampling/sampling_logp_difference/max": d[m].abs().max() if m.any() else q.new_tensor(0.0),
        "sampling/frac_masked": q.new_tensor(0.0) if empty else masked[unit].float().mean(),
        "sampling/frac_truncated": q.new_tensor(0.0) if empty else truncated[unit].float().mean(),
    }
    if w is not None:  # TRL logs the weights it multiplies the loss by, not the ratio they come from
        ws = w[unit]
        stats.update({f"sampling/importance_sampling_ratio/{k}": q.new_tensor(1.0) if empty else f(ws)
                      for k, f in (("mean", torch.mean), ("min", torch.min), ("max", torch.max))})
    return w, stats


# --------------------------------------------------------------------------- the policy losses, by name
@dataclass(frozen=True)
class LossOptions:
    """What a policy loss reads besides its tensors: CISPO's cap on the weight, the clipped ratio's range."""

    epsilon: float = 5.0
    clip_low: float = 0.2
    clip_high: float = 0.2


class PolicyTerm(NamedTuple):
    """A policy loss's per-token objective (to maximise; with gradient), the importance ratio it weighed the samples
    by and where it truncated or clipped them (both for `ratio_stats`)."""

    objective: torch.Tensor
    ratio: torch.Tensor
    clipped: torch.Tensor


PolicyLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, LossOptions], PolicyTerm]
POLICY_LOSSES = Registry("algo.loss_type", "genlight.rl.loss.register_policy_loss")


def register_policy_loss(name: str) -> Callable[[PolicyLoss], PolicyLoss]:
    """Register a policy loss under `name` (`algo.loss_type=name`): fn(logp (N, T) log pi_train with gradient,
    logp_gen (N, T) log pi_gen, adv (N,), mask (N, T), options: LossOptions) -> PolicyTerm. The aggregation, the
    zero-variance filter, the off-policy correction and the KL term are applied around it by `rlvr_loss`."""
    return POLICY_LOSSES.register(name)


def check_policy_loss(name: str) -> PolicyLoss:
    """The loss registered as `name`, or an error naming the key and listing the registered ones."""
    return POLICY_LOSSES.get_fn(name)


@register_policy_loss("cispo")
def cispo(logp, logp_gen, adv, mask, options: LossOptions) -> PolicyTerm:
    """sg(min(rho, eps)) A log pi_train: the gradient flows through log pi only, the weight is capped, not clipped
    (MiniMax-M1)."""
    rho = torch.exp(logp.detach() - logp_gen)  # pi_train / pi_gen, no gradient (sg)
    return PolicyTerm(torch.clamp(rho, max=options.epsilon) * adv.unsqueeze(-1) * logp, rho, rho > options.epsilon)


def clipped_surrogate(rho: torch.Tensor, adv: torch.Tensor, options: LossOptions) -> PolicyTerm:
    """min(rho A, clip(rho, 1 - e_lo, 1 + e_hi) A), the gradient through rho; clipped where the min takes the clip."""
    a = adv.unsqueeze(-1)
    rho_clip = torch.clamp(rho, 1 - options.clip_low, 1 + options.clip_high)
    return PolicyTerm(torch.minimum(rho * a, rho_clip * a), rho.detach(), (rho_clip * a < rho * a).detach())


@register_policy_loss("grpo")
def grpo(logp, logp_gen, adv, mask, options: LossOptions) -> PolicyTerm:
    """PPO's clipped ratio per token (GRPO; DAPO and Dr. GRPO are its presets: their clip, advantage, aggregation)."""
    return clipped_surrogate(torch.exp(logp - logp_gen), adv, options)


register_policy_loss("dapo")(grpo)  # the same objective: `loss=dapo` (conf/loss/dapo.yaml) is what differs


@register_policy_loss("gspo")
def gspo(logp, logp_gen, adv, mask, options: LossOptions) -> PolicyTerm:
    """The clipped ratio on one ratio per sequence (`sequence_ratio`)."""
    return clipped_surrogate(sequence_ratio(logp, logp_gen, mask), adv, options)


def sequence_ratio(logp: torch.Tensor, logp_gen: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO's importance ratio, one per sequence and broadcast over its tokens: exp(mean_t log pi_train / pi_gen) over
    the sequence's `mask`ed tokens, with the gradient of that mean (each token's log-prob weighs 1/|y|)."""
    m = mask.to(logp.dtype)
    log_s = ((logp - logp_gen) * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
    return torch.exp(log_s).expand_as(logp)


# --------------------------------------------------------------------------- the KL to the reference
def kl_term(d: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL estimator of d = log pi(y_t) / pi_ref(y_t), y_t ~ pi; each has expectation KL[pi || pi_ref],
    their gradients as loss terms differ: k1 = d (zero in expectation), k2 = d^2 / 2 (reverse KL's),
    k3 = exp(-d) + d - 1 (forward KL's)."""
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d**2
    if estimator == "k3":
        return torch.exp(-d) + d - 1
    raise ValueError(f"algo.kl_estimator={estimator!r}: must be one of {list(KL_ESTIMATORS)}")


def kl_options(kl_in: str, kl_estimator: str | None) -> str:
    """Validate where the KL goes and its estimator (naming the key at fault); return the estimator (null: the
    place's own, reward k1, loss k3)."""
    if kl_in not in KL_IN:
        raise ValueError(f"algo.kl_in={kl_in!r}: must be one of {list(KL_IN)}")
    estimator = kl_estimator or {"reward": "k1", "loss": "k3"}[kl_in]
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"algo.kl_estimator={kl_estimator!r}: must be one of {list(KL_ESTIMATORS)}")
    if kl_in == "reward" and estimator != "k1":
        raise ValueError(f"algo.kl_in=reward folds k1 = log pi/pi_ref into the reward (the policy gradient carries its "
                         f"gradient); algo.kl_estimator={kl_estimator!r} belongs in the loss: use k1 or null")
    if kl_in == "loss" and estimator == "k1":
        raise ValueError("algo.kl_estimator=k1 as a loss term has a zero gradient in expectation: use k2 (the "
                         "reverse KL's gradient) or k3 in the loss, or algo.kl_in=reward")
    return estimator


def kl_place(beta: float, kl_in: str) -> str | None:
    """Where the KL to the reference acts, decided here alone: "loss" (a per-token term, every group keeps it),
    "reward" (k1 folded into each sample's reward before the advantages; no group leaves the loss, a tied group's
    advantage being its KL part) or None (beta 0: no KL, no reference)."""
    return kl_in if beta > 0 else None


# --------------------------------------------------------------------------- the loss
def token_weights(mask: torch.Tensor, keep: torch.Tensor, how: str, max_len: int | None = None) -> torch.Tensor:
    """Each completion token's weight in the sum that `aggregate` divides by the count of units (B, G, T):

    prompt    1 / sum_g |y_g| of its prompt (ScaleRL: per prompt, sum over its G samples' tokens / their count)
    token     1 (DAPO: every token of the batch alike)
    sequence  1 / |y_i| of its sample (GRPO: per sample, the mean over its tokens)
    constant  1 / max_len, the same for every sample (Dr. GRPO: the sum over a sample's tokens over the generation
              budget, TRL's loss_type="dr_grpo": sum / (N * max_completion_length)), then the mean over all the step's
              samples, kept or not (`count_units`)
    0 for the groups that keep = False drops. Counted over whole groups, so that a micro-batch holding part of a
    group weighs its tokens exactly as the whole step would.
    """
    m = (mask & keep[:, None, None]).float()
    if how == "prompt":
        return m / m.sum((1, 2), keepdim=True).clamp(min=1)
    if how == "token":
        return m
    if how == "sequence":
        return m / m.sum(-1, keepdim=True).clamp(min=1)
    if how == "constant":
        if not max_len or max_len < 1:
            raise ValueError("algo.loss_agg=constant divides by the generation budget: it needs max_len >= 1")
        return m / max_len
    raise ValueError(f"algo.loss_agg={how!r}: must be one of {list(AGGREGATIONS)}")


def aggregate(loss: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor, how: str,
              normalizer: float | torch.Tensor | None = None, max_len: int | None = None) -> torch.Tensor:
    """Reduce per-token losses (B, G, T) over the kept groups' completion tokens: the sum of per-unit means
    (`token_weights`) over the number of units (prompts, tokens, samples: `count_units`).
    `normalizer` replaces the local count of units, e.g. by the count over all processes divided by their
    number, so that DDP's gradient average is exact.
    """
    n = count_units(mask, keep, how) if normalizer is None else normalizer
    return (loss * token_weights(mask, keep, how, max_len)).sum() / max(float(n), 1.0)


def count_units(mask: torch.Tensor, keep: torch.Tensor, how: str) -> torch.Tensor:
    """How many prompts / tokens / samples `aggregate` averages over: those of the kept groups, except `constant`,
    whose normaliser is a constant of the step, every sample (Dr. GRPO, TRL's dr_grpo: N x budget, a filtered group
    counting with A = 0), so that it does not grow as more groups tie."""
    if how == "constant":
        return torch.tensor(mask.shape[0] * mask.shape[1], device=mask.device)
    m = mask & keep[:, None, None]
    if how == "prompt":
        return (m.sum((1, 2)) > 0).sum()
    if how == "token":
        return m.sum()
    return (m.sum(-1) > 0).sum()


def loss_groups(keep: torch.Tensor, beta: float, kl_in: str, entropy_coef: float = 0.0) -> torch.Tensor:
    """The groups the loss averages over: the kept ones, or with a KL term or an entropy bonus in the loss all of them
    (each keeps that term, and the reward term's weight must not depend on how many groups tie)."""
    return torch.ones_like(keep) if kl_place(beta, kl_in) == "loss" or entropy_coef > 0 else keep


def rlvr_loss(
    logp: torch.Tensor,
    logp_gen: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    keep: torch.Tensor | None = None,
    *,
    loss_type: str = "cispo",
    loss_agg: str = "prompt",
    epsilon: float = 5.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    max_len: int | None = None,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    kl_in: str = "loss",
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    normalizer: float | torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    is_weight: torch.Tensor | None = None,
    with_stats: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The policy loss (to minimise: -J) and importance-ratio statistics (`ratio_stats`).

    logp: log pi_train(y_t) (B, G, T), with gradient; logp_gen: log pi_gen(y_t) from the sampler;
    adv: advantages (B, G); mask: completion tokens (B, G, T); keep: groups whose policy-gradient term is in the loss
    (B,), the zero-variance filter's. `loss_type` names the registered policy loss (`POLICY_LOSSES`), `loss_agg` the
    aggregation (`token_weights`; `max_len` the constant's budget).
    A micro-batch of samples passes (N, T) tensors, adv (N,) (0 for the groups the filter drops), and its tokens'
    `weights` (`token_weights` of the whole step) with the whole step's `normalizer`: the micro-batches' losses then
    sum to the step's.
    With beta > 0 and `kl_in=loss` (`kl_place`), the KL term of `kl_estimator` on `ref_logp` (log pi_ref), for every
    group, filtered or not (`loss_groups`); with `kl_in=reward` the penalty is already in the advantages
    (`kl_penalised_rewards`).
    With `entropy_coef` > 0, + entropy_coef H_t per token (`entropy`: the entropy of pi_train at each position, with
    its gradient; verl's `entropy_coeff`), for every group as the KL term, aggregated as the policy-gradient term.
    `is_weight` (`is_weights`, no gradient) multiplies each token's policy-gradient term and not its KL term (TRL's
    place: `per_token_loss * importance_sampling_ratio`, then `+ beta * per_token_kl`): the off-policy correction;
    `logp_gen` is then pi_old, recomputed by the trainer.
    """
    options = LossOptions(epsilon, clip_low, clip_high)
    term = check_policy_loss(loss_type)(logp, logp_gen, adv, mask, options)
    objective = term.objective
    if keep is not None:  # the filter removes the policy-gradient term of tied groups (their A is 0 already)
        objective = objective * keep[:, None, None]
    if is_weight is not None:  # the policy-gradient term only: the KL term below is not the sampler's to correct
        objective = objective * is_weight
    if kl_place(beta, kl_in) == "loss":
        if ref_logp is None:
            raise ValueError("algo.beta > 0 needs the reference log-probs")
        iw = torch.clamp(torch.exp(logp.detach() - logp_gen), max=epsilon)  # sg(min(rho, eps)): samples from pi_gen
        objective = objective - beta * iw * kl_term(logp - ref_logp, kl_estimator)
    if entropy_coef > 0:
        if entropy is None:
            raise ValueError("algo.entropy_coef > 0 needs the entropy of each position")
        objective = objective + entropy_coef * entropy
    if weights is None:  # the whole step: its own weights and count of units (`aggregate`)
        keep = torch.ones(adv.size(0), dtype=torch.bool, device=adv.device) if keep is None else keep
        units = loss_groups(keep, beta, kl_in, entropy_coef)
        weights = token_weights(mask, units, loss_agg, max_len)
        normalizer = count_units(mask, units, loss_agg) if normalizer is None else normalizer
    loss = (-objective * weights).sum() / max(float(normalizer), 1.0)
    stats = ratio_stats(logp.detach(), logp_gen, adv, mask, loss_type, options, ref_logp, beta) if with_stats else {}
    return loss, stats


@torch.no_grad()
def ratio_stats(logp, logp_gen, adv, mask, loss_type: str, options: LossOptions, ref_logp=None, beta=0.0):
    """Over the completion tokens: |log pi_train - log pi_gen| (policy lag + engine mismatch), the loss's ratio's
    mean and max, the share of tokens whose weight it truncated (CISPO) or clipped (PPO), and with beta > 0 the k3 KL.
    The ratio and the clipping are the registered loss's own (`PolicyTerm`)."""
    m = mask.bool()
    term = check_policy_loss(loss_type)(logp, logp_gen, adv, mask, options)
    r = term.ratio[m]
    drift = (logp - logp_gen)[m].abs()
    stats = {
        "logp_diff/mean": drift.mean() if r.numel() else r.new_tensor(0.0),
        "logp_diff/max": drift.max() if r.numel() else r.new_tensor(0.0),
        "rho/mean": r.mean() if r.numel() else r.new_tensor(1.0),
        "rho/max": r.max() if r.numel() else r.new_tensor(1.0),
        "rho/frac_truncated": term.clipped[m].float().mean() if r.numel() else r.new_tensor(0.0),
    }
    if beta > 0 and ref_logp is not None:  # the k3 estimate of KL[pi || pi_ref] per token, whichever option trains
        stats["kl"] = kl_term((logp - ref_logp)[m], "k3").mean() if r.numel() else r.new_tensor(0.0)
    return stats
